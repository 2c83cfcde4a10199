"""resize-proxy: resize images kept in S3 on the fly, with libvips."""

__version__ = "0.1.0"

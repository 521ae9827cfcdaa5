"""longdoc: long-document summarization, question answering and classification."""

__version__ = "0.1.0"

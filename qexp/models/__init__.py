"""Float architectures. Every constructor takes ``in_channels``, ``num_classes`` and ``image_size``
(filled in from the dataset) plus its own options; quantization never appears here."""

"""The gRPC front doors: classifier.v1 (``classifier``), the Open Inference Protocol
(``oip``), and the call envelope's gRPC side (``envelope``)."""

"""The server: one data plane behind the gRPC (classifier.v1, the Open Inference Protocol)
and HTTP front doors, with the repository, batching, admission, worker processes, config,
metrics and security. ``python -m service`` runs it (``service.server.main``)."""

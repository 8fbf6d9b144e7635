"""The HTTP front door: the Open Inference Protocol over REST, the upload routes and the
page (FastAPI), and the call envelope's HTTP side."""

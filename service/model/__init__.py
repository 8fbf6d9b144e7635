"""The model contract both sides share: the ModelSpec a model carries, the repository
layout, preprocessing (decode, limits, resize policy), postprocessing (top-k, boxes, CAM
heatmaps), the runner (the only onnxruntime user) and its options, and the offline
pipeline. Training imports this package and nothing else of service/; it imports nothing
of the server or the client."""

"""tilecore.runtime: the lean inference core (numpy, onnxruntime, faiss, opencv; never torch or timm).

It owns everything that training and deployment must compute identically: image preprocessing,
nearest-neighbour scoring, anomaly-map post-processing and the artifact helpers.
"""

"""tilecore.export: a trained run -> a self-describing bundle of ONNX engines and FAISS indexes."""

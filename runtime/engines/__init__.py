"""Backbone engines: normalised tiles [N, 3, h, w] -> patch embeddings [N, h', w', D] float32.

- base: what every backend shares (EngineOptions, BundleGraph, the Engine protocol, BackendMissing).
- table: the one table of backends and precisions (names, what each is, what it computes in, its extra).
- opener: open_engine / open_backend, the only module that imports the backends.
- onnx_runtime, openvino, tensorrt (+ tensorrt_plans, gpu_stack): the backends.

Backends import base (and their own helpers), never opener: the import graph has no cycle
(tests/runtime/test_import_graph.py).
"""

"""Peer servers the benchmark compares exitserve against: the same fine-tuned weights
served naively (PyTorch fp32, one request at a time) and by ONNX Runtime int8 with
dynamic batching. Both always run the full network."""

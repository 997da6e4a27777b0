"""Offline model pipeline: data set -> train (torch) -> ONNX step graph -> validate -> publish.

Needs the `train` extra (torch, onnx). The online service never imports this package.
"""

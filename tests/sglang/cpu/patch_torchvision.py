# PyPI torchvision wheels are built against CUDA torch; on the CPU torch wheel
# their _C.so fails to load and the unconditional register_fake("torchvision::...") calls
# raise "operator torchvision::nms does not exist" at `import torchvision`.
import pathlib
import sys

p = pathlib.Path(sys.argv[1]) / "torchvision" / "_meta_registrations.py"
s = p.read_text()
if "_maybe_register_fake" not in s:
    s = s.replace("import torchvision.extension  # noqa: F401",
        "import torchvision.extension  # noqa: F401\n\n\ndef _maybe_register_fake(name):\n"
        "    if torchvision.extension._has_ops():\n        return torch.library.register_fake(name)\n"
        "    return lambda fn: fn\n", 1)
    s = s.replace("@torch.library.register_fake(", "@_maybe_register_fake(")
    p.write_text(s)
print("patched", p)

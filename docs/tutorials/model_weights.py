"""Tutorial: model weights by name, each tensor fetched where it is touched.

Runs as it is (root, Linux, NumPy and safetensors installed): it writes a small synthetic model
as a safetensors file and as an .npz, and maps its tensors with ``lazy_tensors``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import safetensors.numpy

from userfaultfd.runtime import lazy_tensors, server_of

# --8<-- [start:model]
# A small "model": an embedding, four layers and a norm, 4.3 MB of float32. Tensor k holds
# k * 2**20 + 1, k * 2**20 + 2, ...: every element differs from every other, none is zero, and
# all are exact in float32, so a page from the wrong place (or zeros) fails the checks.
SHAPES = {"embed": (1024, 256), "norm": (256,)}
SHAPES |= {f"layers.{i}.mlp": (256, 512) for i in range(4)}


def expected(name: str) -> np.ndarray:
    k = list(SHAPES).index(name)
    count = int(np.prod(SHAPES[name]))
    return (np.arange(count, dtype=np.float32) + (k << 20) + 1).reshape(SHAPES[name])


# --8<-- [end:model]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # --8<-- [start:save]
        path = Path(tmp) / "model.safetensors"
        weights = {name: expected(name) for name in SHAPES}
        safetensors.numpy.save_file(weights, str(path), metadata={"layers": "4"})
        # --8<-- [end:save]

        # --8<-- [start:direct]
        # A local file and no option: the kernel's own mapping of the file, no handler.
        tensors = lazy_tensors(path)
        assert sorted(tensors) == sorted(SHAPES)  # in file order (safetensors chooses it)
        assert tensors.metadata["layers"] == "4"
        for name in SHAPES:
            assert tensors[name].shape == SHAPES[name]
            assert np.array_equal(tensors[name], expected(name)), name
        assert not tensors["embed"].flags.writeable  # read-only views
        # --8<-- [end:direct]

        # --8<-- [start:selection]
        # Three layers of four, through a handler: the embedding, the norm and layers.3 are
        # never read; layers.2 is read ahead in the background, behind any fault.
        part = lazy_tensors(
            path, include="layers.*", exclude="layers.3.*", prefetch=["layers.2.mlp"]
        )
        assert sorted(part) == ["layers.0.mlp", "layers.1.mlp", "layers.2.mlp"]
        assert part["layers.1.mlp"][17, 300] == expected("layers.1.mlp")[17, 300]
        assert np.array_equal(part["layers.2.mlp"], expected("layers.2.mlp"))
        stats = server_of(part["layers.0.mlp"]).stats()
        layer_bytes = 256 * 512 * 4
        print(f"selection: {stats.bytes:,} bytes filled, {stats.prefetched} pages prefetched")
        assert stats.bytes < 3 * layer_bytes, "more than the three selected layers was filled"
        # --8<-- [end:selection]

        # --8<-- [start:npz]
        # An .npz of stored (not compressed) members is read the same way.
        npz = Path(tmp) / "model.npz"
        np.savez(npz, **weights)  # type: ignore[arg-type]  # numpy's stub: allow_pickle
        from_npz = lazy_tensors(npz, include=["norm", "layers.0.mlp"], direct=False)
        assert from_npz.format == "npz"
        assert np.array_equal(from_npz["norm"], expected("norm"))
        assert from_npz["layers.0.mlp"][-1, -1] == expected("layers.0.mlp")[-1, -1]
        # --8<-- [end:npz]
    print("model weights: every check passed")


if __name__ == "__main__":
    main()

"""The dtype table (sparsamba.formats) against the gguf package, the packed file and the engine."""

import gguf
import numpy as np
import pytest
from conftest import PRUNED_CONFIGS, random_pruned

from sparsamba import formats
from sparsamba.compile import compile_model
from sparsamba.compile.packed_v2 import unpack_matrix
from sparsamba.errors import SparsambaError


@pytest.mark.parametrize("name", formats.PACKED)
def test_table_matches_gguf(name):
    d = formats.DTYPES[name]
    assert d.name == name and d.numpy.itemsize == d.value_bytes
    assert d.torch.itemsize == d.value_bytes
    assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(d.ggml_type)] == (1, d.value_bytes)
    if d.llama_ftype is not None:
        assert gguf.LlamaFileType(d.llama_ftype).name in ("ALL_F32", "MOSTLY_F16")
    assert formats.by_ggml_type(d.ggml_type) == name


def test_get_refuses_what_is_not_allowed():
    assert formats.get(None) is formats.F32  # a plan not packed yet holds fp32
    assert formats.LLAMACPP == ("f32", "f16")
    with pytest.raises(SparsambaError, match="dtype 'int8' is not supported; use one of f32, f16"):
        formats.get("int8", formats.LLAMACPP)
    assert formats.by_ggml_type(99) == "99"


def test_engine_and_file_report_the_table(tmp_path):
    from sparsamba.runtime.engine import Engine

    name, kw = next(iter(PRUNED_CONFIGS.items()))
    src = random_pruned(tmp_path / name, **kw)
    for d in formats.DTYPES.values():
        path = compile_model(src, tmp_path / f"{d.name}.gguf", dtype=d.name).path
        blobs = [t for t in gguf.GGUFReader(path).tensors if t.name.endswith(".v2")]
        assert {int(t.tensor_type) for t in blobs} == {int(gguf.GGMLQuantizationType.I8)}  # bytes
        mats = [unpack_matrix(np.array(t.data).view(np.uint8)) for t in blobs]
        assert {m.dtype for m in mats} == {d.name}  # the blob header's dtype is the table's
        assert all((c.scale is not None) == d.scaled for m in mats for c in m.classes)
        with Engine(path) as eng:
            assert eng.info.dtype == d.name

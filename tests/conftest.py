import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest


@pytest.fixture(scope="module")
def layer():
    """SmolLM2's output layer, read from the registry GGUF (real-model tests)."""
    pytest.importorskip("llama_cpp", reason="real-model tests need llama-cpp-python (scripts/setup.sh)")
    from bat_models import output_layer, smollm2_path

    return output_layer(smollm2_path())


@pytest.fixture(scope="module")
def basis(layer):
    import bat_core

    return bat_core.Basis(layer.W, bias=layer.bias, softcap=layer.softcap)

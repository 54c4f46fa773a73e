"""Worker for the ``attention-sinks`` peer of ``bench.latency``: the ``attention_sinks`` package
(0.4.0, the StreamingLLM authors' recommended drop-in for transformers) decoding one token at a
time, driven over stdin/stdout so that ``bench.latency`` interleaves it token by token with the
other methods on the same weights.

attention_sinks pins transformers 4.34, which cannot share an environment with this library's
transformers 5.x, so this file runs under the Python of its own environment and imports nothing
from ``streaming_trt``. Set that environment up once (CPU torch is reused from the main one):

    python -m venv --system-site-packages /tmp/sinks-venv
    /tmp/sinks-venv/bin/pip install --no-deps transformers==4.34.0 "tokenizers>=0.14,<0.15" \\
        huggingface_hub==0.17.3 attention_sinks==0.4.0 einops
    python -m bench.latency --methods streaming,hf-dense,attention-sinks --sinks-python /tmp/sinks-venv/bin/python

Protocol, one JSON object per line:
  -> {"cmd": "load", "dir": D, "dtype": "float32", "threads": 1}    <- {"ok": true, "transformers": "4.34.0"}
  -> {"cmd": "prepare", "sink_tokens": S, "window": W, "fill": N, "seed": 0}
                     (a fresh cache, then N random tokens fed in chunks of 512)   <- {"ok": true}
  -> {"cmd": "step", "token": id}      <- {"ok": true, "seconds": s}  (one decode step, model call only)
  -> {"cmd": "quit"}
Errors come back as {"ok": false, "error": "..."}.
"""
from __future__ import annotations

import json
import sys
import time
import warnings


def main() -> int:
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        return 0
    import torch

    warnings.simplefilter("ignore")
    model = past = None
    vocab = 100
    out = sys.stdout
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["cmd"] == "quit":
                break
            if msg["cmd"] == "load":
                import transformers
                from attention_sinks import AutoModelForCausalLM

                if msg.get("threads"):
                    torch.set_num_threads(int(msg["threads"]))
                dtype = getattr(torch, msg.get("dtype", "float32"))
                directory = msg["dir"]
                model_kwargs = dict(torch_dtype=dtype)
                reply = dict(ok=True, transformers=transformers.__version__)
            elif msg["cmd"] == "prepare":
                model = AutoModelForCausalLM.from_pretrained(
                    directory, attention_sink_size=msg["sink_tokens"],
                    attention_sink_window_size=msg["window"], **model_kwargs).eval()
                vocab = min(model.config.vocab_size, 100)
                g = torch.Generator().manual_seed(int(msg.get("seed", 0)))
                ids = torch.randint(0, vocab, (1, int(msg["fill"])), generator=g)
                past = None
                with torch.inference_mode():
                    for lo in range(0, ids.shape[1], 512):
                        past = model(input_ids=ids[:, lo : lo + 512], past_key_values=past,
                                     use_cache=True).past_key_values
                reply = dict(ok=True)
            elif msg["cmd"] == "step":
                token = torch.tensor([[int(msg["token"])]])
                with torch.inference_mode():
                    start = time.perf_counter()
                    past = model(input_ids=token, past_key_values=past, use_cache=True).past_key_values
                    seconds = time.perf_counter() - start
                reply = dict(ok=True, seconds=seconds, cached=int(past[0][0].shape[-2]))
            else:
                reply = dict(ok=False, error=f"unknown command {msg['cmd']!r}")
        except Exception as e:  # sent back: the bench turns it into one line
            reply = dict(ok=False, error=f"{type(e).__name__}: {e}")
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

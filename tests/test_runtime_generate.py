"""Generation loop, sampling and streaming."""
import os
import subprocess
import sys
import threading

import pytest
import torch

from ahn_runtime.generate import SamplingParams, Stopped, TextStream, generate, prefill, sample
from runtime_helpers import SMOLLM2, gdn, random_ids, run_logits


def test_greedy_generation_follows_argmax():
    model = gdn(window=16, sinks=2)
    ids = random_ids(60, seed=9)
    out = list(generate(model, model.new_state("ahn"), ids, SamplingParams(max_new_tokens=12)))
    assert len(out) <= 12
    logits, _ = run_logits(model, torch.cat([ids, torch.tensor(out, dtype=torch.long)]))
    assert out == logits[59:59 + len(out)].argmax(-1).tolist()
    if len(out) < 12:  # stopped early: only at an EOS id
        assert int(logits[59 + len(out)].argmax()) == 1001


def test_stop_halts_at_once_in_decode_and_prefill():
    model = gdn(window=16, sinks=2)
    stop = threading.Event()
    got = []
    for tok in generate(model, model.new_state("ahn"), random_ids(40), SamplingParams(max_new_tokens=50), stop=stop):
        got.append(tok)
        if len(got) == 3:
            stop.set()
    assert len(got) == 3
    stop2 = threading.Event()
    seen = []

    def progress(done, total):
        seen.append(done)
        stop2.set()

    with pytest.raises(Stopped):
        prefill(model, model.new_state("ahn"), random_ids(100), chunk_size=10, progress=progress, stop=stop2)
    assert seen == [10]


def test_sampling_rules():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    assert sample(logits, SamplingParams()) == 1
    g = torch.Generator().manual_seed(0)
    assert all(sample(logits, SamplingParams(temperature=1.0, top_k=1), generator=g) == 1 for _ in range(20))
    picks = {sample(logits, SamplingParams(temperature=1.0, top_p=0.8), generator=g) for _ in range(200)}
    assert picks == {1, 2}  # p(1)=.66, p(2)=.24: the smallest set reaching 0.8 is {1, 2}
    seen = torch.tensor([False, True, False, False])
    assert sample(logits, SamplingParams(repetition_penalty=2.0), seen) == 2  # 3/2 < 2


@pytest.mark.skipif(not os.path.isfile(SMOLLM2), reason="real test model missing (fetch-test-models)")
def test_text_stream_and_cli_generate_on_real_model():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.dirname(SMOLLM2), gguf_file=os.path.basename(SMOLLM2))
    text = "Long documents, «unicode» and emoji 🧠 stream correctly."
    ids = tok(text)["input_ids"]
    ts = TextStream(tok)
    pieces = [ts.push(t) for t in ids]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert "" in pieces  # the emoji spans several byte tokens: incomplete UTF-8 is held back, never emitted
    r = subprocess.run([sys.executable, "-m", "ahn_runtime", "generate", "--base", SMOLLM2, "--mode", "window",
                        "--window", "64", "--sinks", "4", "--prompt", "What is the capital of France?",
                        "--max-new-tokens", "12"], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "time to first token" in r.stderr

"""A small sequential-editing job (run as a subprocess by test_resume.py).

usage: sequential_job.py METHOD CHECKPOINT OUT_CSV [CHECKPOINT_MINUTES]

With CHECKPOINT_MINUTES, the run's clock advances one minute per reading (so checkpoints fall
every few batches, whatever the machine's speed); without, the checkpoint is written after every batch.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))  # this checkout's editlib, whatever is installed
torch.set_num_threads(1)

from conftest import MinutePerReading, corpus_sentences, make_llama, make_requests  # noqa: E402

from editlib.editing.statistics import collect_second_moments  # noqa: E402
from editlib.methods.grace import GraceHparams  # noqa: E402
from editlib.methods.registry import make_hparams  # noqa: E402
from editlib.model.layout import model_layout  # noqa: E402
from editlib.study.experiments import ExperimentContext, sequential_edits  # noqa: E402
from editlib.toy.vocab import train_bpe_tokenizer  # noqa: E402


def main(method: str, checkpoint: str, out_csv: str, checkpoint_minutes: str | None = None) -> None:
    corpus = corpus_sentences()
    tokenizer = train_bpe_tokenizer(corpus, vocab_size=600, add_bos=True)
    model = make_llama(tokenizer, layers=2)
    moments = collect_second_moments(model, tokenizer, model_layout(model), [0, 1], corpus, progress=False)
    ctx = ExperimentContext(model, tokenizer, "tiny", {l: m.mean for l, m in moments.items()}, progress=False)
    if method == "grace":
        spec = GraceHparams(layers=(1,), n_iter=5)
    else:
        threshold = float(torch.linalg.eigvalsh(ctx.second_moments[0].double())[96])
        own = {"nullspace_threshold": threshold, "l2": 1e-2} if method == "alphaedit" else {"mom2_update_weight": 1.0}
        spec = make_hparams(method, layers=(0, 1), targets={"v_num_grad_steps": 6}, **own)
    timing = {} if checkpoint_minutes is None else {"checkpoint_minutes": float(checkpoint_minutes),
                                                     "clock": MinutePerReading()}
    frame, _, _ = sequential_edits(ctx, make_requests(6), spec, batch_size=1, total_edits=6, checkpoint_path=checkpoint,
                                **timing)
    frame.to_csv(out_csv, index=False)


if __name__ == "__main__":
    main(*sys.argv[1:])

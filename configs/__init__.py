"""Training presets: one file per run, each defining `get_config() -> train.config.TrainConfig`.

    tiny.py                     CPU demo (stdlib sources, BPE 1024, a few minutes on 2 cores)
    tiny_softmax.py             its softmax control
    qwen3_0p6b_parallax.py      Qwen3-0.6B shapes, Parallax, Muon + WSD, L=4096
    qwen3_0p6b_softmax.py       its softmax control (MLP widened to match parameters)
    qwen3_0p6b_parallax_adamw.py  AdamW-only variant
    qwen3_1p7b_parallax.py      Qwen3-1.7B shapes, Parallax
    qwen3_1p7b_softmax.py       its softmax control
"""

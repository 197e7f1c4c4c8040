"""Quality-study presets and grids (see docs/study.md).

    common.py    the study model (~107M Qwen3-style, L=1024) and its training config
    main.py      Parallax vs the parameter-matched softmax control, under Muon and AdamW
    gate.py      the correction gate, under Muon and AdamW
    wr.py        W_R recipe ablations under Muon: r_init='like_q', r_norm, a fixed r scale
    smoke.py     a 2-arm grid of a tiny model for a CPU check of the runner
    tokenizer.json  the byte-level BPE (16384) the study's data is tokenized with
"""

from sdft.models import clip_tokenizer


def test_tokenizer_gives_sd_clip_ids_offline():
    tok = clip_tokenizer()
    assert tok("a scribble of apple").input_ids == [49406, 320, 2139, 5924, 539, 3055, 49407]
    assert len(tok) == 49408
    assert tok.model_max_length == 77
    padded = tok("a scribble of apple", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407

"""Notebook 06's DreamBooth and Textual Inversion each teach the miniature the sample subject, measured
by ``world.check``. (Its LoRA is measured on the course run itself, in test_notebooks.py.)

Each test runs the course's own functions with notebook 06's smoke settings (the same numbers: keep
them in step with the notebook; DreamBooth's are in conftest.py's ``sample_subject``) and compares ``world.hit_rate`` before and after. The thresholds leave
a margin to the figures measured on the shipped miniature, which are written beside them.
"""

import pytest

from sdcourse import dreambooth, lora, models, sampling, textual_inversion, world

SAMPLE_STEPS = 20  # notebook 06's SAMPLE["steps"] in smoke mode


@pytest.fixture
def pipe(tiny_sd_path):
    pipe = models.load_pipeline(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    sampling.set_scheduler(pipe, "DPM++ 2M Karras")  # as notebook 06 samples
    return pipe


def rate(pipe, expected):
    return world.hit_rate(pipe, expected, steps=SAMPLE_STEPS)


@pytest.fixture
def subject(tmp_path):
    folder, class_word = dreambooth.choose_subject("", "", use_sample=True, out_dir=tmp_path / "instance")
    assert len(list(folder.iterdir())) == 3 and class_word == dreambooth.SAMPLE_SUBJECT[1]
    return folder, class_word


def test_dreambooth_names_the_subject_and_keeps_its_class(pipe, sample_subject):
    instance_prompt, class_prompt = sample_subject.instance_prompt, sample_subject.class_prompt
    pipe.load_lora_weights(sample_subject.lora, weight_name=lora.WEIGHT_NAME, adapter_name="dreambooth")
    as_subject = {prompt: [(prompt, *dreambooth.SAMPLE_SUBJECT)] * 16 for prompt in (instance_prompt, class_prompt)}
    figures = {}
    for w in (0.0, 1.0):
        pipe.set_adapters(["dreambooth"], adapter_weights=[w])
        figures[w] = {prompt: rate(pipe, expected) for prompt, expected in as_subject.items()}
    # Measured: "a photo of sks circle" drawn as the green circle 0 of 16 before, 12 of 16 after;
    # "a photo of a circle" 0 of 16 before and after.
    assert figures[0.0][instance_prompt] <= 0.1 and figures[1.0][instance_prompt] >= 0.5, figures
    assert figures[1.0][class_prompt] <= 0.125, figures  # prior preservation: the class did not become the subject


def test_textual_inversion_learns_a_word_for_the_subject(pipe, tiny_sd_path, subject, tmp_path):
    instance_dir, class_word = subject
    token = "<sdcourse-subject>"
    cfg = textual_inversion.TIConfig(model=tiny_sd_path, dataset=str(instance_dir), output_dir=str(tmp_path / "ti"),
                                     token=token, init_word=class_word, what="object", steps=100, lr=2e-2,
                                     resolution=64, batch_size=4)
    result = textual_inversion.train_embedding(cfg)
    before = rate(pipe, [(f"a photo of a {class_word}", *dreambooth.SAMPLE_SUBJECT)] * 16)
    pipe.load_textual_inversion(str(result.embedding_file), token=token)
    after = rate(pipe, [(f"a photo of a {token}", *dreambooth.SAMPLE_SUBJECT)] * 16)
    # Measured: the green circle 0 of 16 from "a photo of a circle", 10 of 16 from the new word.
    assert before <= 0.1 and after >= 0.4, f"the subject: {before:.0%} from the class word, {after:.0%} from the new word"

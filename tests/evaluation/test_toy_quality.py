import json


def test_quality_script_reports_an_untrained_model_as_failing(tmp_path, tiny_pipe_dir):
    """Random tiny models must fail the bar: the script measures, it does not rubber-stamp."""
    from evaluation.toy_quality import main
    from training.toy_world.tiny import tiny_clip

    clip, processor = tiny_clip()
    clip.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    out = tmp_path / "q.json"
    args = ["--sd", str(tiny_pipe_dir), "--clip", str(tmp_path / "clip"), "--out", str(out)]
    code = main(
        [*args, "--prompts-per-caption", "1", "--clip-images", "12", "--steps", "2", "--grid", str(tmp_path / "g.png")]
    )
    report = json.loads(out.read_text())
    assert code == 1
    assert report["generator"]["prompts"] == 36
    assert not all(report["passed"].values())
    assert len(report["generator"]["failures"]) > 0
    assert (tmp_path / "g.png").stat().st_size > 0

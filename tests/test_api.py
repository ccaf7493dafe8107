import medmerge


def test_linear_merge_writes_loadable_model(llama_family, tmp_path):
    cfg = {"merge_method": "linear", "models": [
        {"model": str(llama_family["a"]), "parameters": {"weight": 0.5}},
        {"model": str(llama_family["b"]), "parameters": {"weight": 0.5}}]}
    result = medmerge.merge(cfg, tmp_path / "out", progress=False)
    assert result.verification.ok
    assert (tmp_path / "out" / "medmerge.yml").is_file()

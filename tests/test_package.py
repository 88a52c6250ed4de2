import pkgutil

import tamperbench


def test_the_package_docstring_names_every_module():
    modules = {m.name for m in pkgutil.iter_modules(tamperbench.__path__)} - {"__main__"}
    missing = sorted(m for m in modules if f"tamperbench.{m}`" not in tamperbench.__doc__)
    assert not missing, f"tamperbench.__doc__ does not name: {missing}"


def test_study_parameters_match_what_the_chapters_get():
    from tamperbench import config, models

    study = config.study("cpu")
    chapter = config.load().parameters("cpu", "02_attacks")
    for key in ("seed", "dataset", "model", "epochs", "lr", "n_train", "n_pool", "attack_suite"):
        assert study[key] == chapter[key], key
    assert models.TrainConfig.from_study(study).epochs == chapter["epochs"]
    assert config.study("cpu", {"attack_suite.fgsm.eps": 0.2})["attack_suite"]["fgsm"]["eps"] == 0.2

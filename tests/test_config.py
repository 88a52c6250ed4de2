import shutil
import textwrap

import pytest

from tamperbench import config


def test_the_study_configuration_is_valid():
    cfg = config.load()
    assert {"ci", "cpu", "gpu"} <= set(cfg.profiles)
    assert cfg.default_profile == "cpu"
    params = cfg.parameters("ci", "01_classifier")
    assert params["profile"] == "ci" and params["seed"] == 0
    assert params["epochs"] == 1  # the ci profile's override of a shared value
    assert cfg.parameters("gpu", "01_classifier")["model"] == "resnet18_32"
    # optional shared parameters go only to the notebooks that declare them
    assert "attack_suite" not in params
    assert set(cfg.parameters("cpu", "02_attacks")["attack_suite"]) == {
        "fgsm", "bim", "pgd", "deepfool", "cw_l2", "hopskipjump", "boundary", "pixel", "square", "apgd_ce", "apgd_dlr", "autoattack"}


def _write(tmp_path, body: str):
    path = tmp_path / "_config.yml"
    path.write_text(textwrap.dedent(body))
    return path


SHARED = """
shared: {seed: 0, device: auto, dataset: fashion_mnist, model: smallcnn, epochs: 1, batch_size: 8, lr: 0.1, n_train: null,
         n_pool: 10, attack_suite: {fgsm: {n: 10, eps: 0.1}}, particul: {epochs: 1}, particul_search: {},
         combination: {}}
"""


@pytest.mark.parametrize(
    "body, message",
    [
        (SHARED + "profiles: {cpu: {}}\nplots: 1\n", "unknown key 'plots'.*valid keys: shared, default_profile, profiles"),
        (SHARED.replace("seed: 0", "sead: 0") + "profiles: {cpu: {}}", "unknown key 'sead' in shared; valid keys: seed"),
        (SHARED.replace("seed: 0", "seed: zero") + "profiles: {cpu: {}}", "shared.seed must be int"),
        (SHARED.replace("epochs: 1", "epochs: true") + "profiles: {cpu: {}}", "shared.epochs must be int"),
        (SHARED.replace("smallcnn", "bigcnn") + "profiles: {cpu: {}}", "unknown model 'bigcnn'; valid choices: resnet18_32, smallcnn"),
        (SHARED + "profiles: {cpu: {01_clasifier: {n_show: 2}}}", "unknown key '01_clasifier'.*valid keys: shared, 01_classifier"),
        (SHARED + "profiles: {cpu: {01_classifier: {n_shw: 2}}}", "unknown parameter 'n_shw'.*valid parameters: .*n_show"),
        (SHARED + "profiles: {cpu: {01_classifier: {n_show: two}}}", "n_show must be int"),
        (SHARED + "default_profile: gpu\nprofiles: {cpu: {}}", "default_profile 'gpu' is not a profile"),
        (SHARED.replace("fgsm:", "fgsn:") + "profiles: {cpu: {}}", "unknown attack 'fgsn'; valid attacks: fgsm, bim"),
        (SHARED.replace("eps: 0.1", "eps: 2.0") + "profiles: {cpu: {}}", r"attack_suite.fgsm: fgsm: eps=2.0 is outside \[0, 1\]"),
        (SHARED.replace("n: 10,", "n: -1,") + "profiles: {cpu: {}}", "attack_suite.fgsm.n must be an int ≥ 1"),
        (SHARED.replace("n_pool: 10, ", "") + "profiles: {cpu: {}}", "shared lacks n_pool"),
        (SHARED.replace("epochs: 1}", "epochs: 0}") + "profiles: {cpu: {}}", "shared.particul: particul: epochs must be an int ≥ 1"),
        (SHARED.replace("particul: {epochs: 1}", "particul: {parts: 4}") + "profiles: {cpu: {}}", "shared.particul: particul: .*parts"),
        (SHARED.replace("particul_search: {}", "particul_search: {num_parts: 4}") + "profiles: {cpu: {}}",
         "shared.particul_search: particul_search.num_parts must be a list of ints"),
        (SHARED.replace("particul_search: {}", "particul_search: {layer: block2}") + "profiles: {cpu: {}}",
         "unknown particul_search keys.*valid keys: layers, num_parts, multi_layer, selection_attack"),
        (SHARED.replace("particul_search: {}", "particul_search: {selection_attack: pgd}") + "profiles: {cpu: {}}",
         "selection_attack 'pgd' is not in the attack suite; valid: fgsm"),
        (SHARED.replace("combination: {}", "combination: {members: [msp, lid]}") + "profiles: {cpu: {}}",
         r"shared.combination: combination: members \['lid'\] are not unsupervised detectors; valid: particul"),
        (SHARED.replace("combination: {}", "combination: {selection_attacks: [pgd]}") + "profiles: {cpu: {}}",
         r"combination.selection_attacks \['pgd'\] are not in the attack suite; valid: fgsm"),
    ],
)
def test_bad_configurations_name_the_problem_and_the_choices(tmp_path, body, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(_write(tmp_path, body))


def test_unknown_profile_and_override_keys():
    cfg = config.load()
    with pytest.raises(config.ConfigError, match="valid profiles: ci, cpu, gpu"):
        cfg.parameters("laptop", "01_classifier")
    with pytest.raises(config.ConfigError, match="unknown parameter 'epoch'.*valid parameters:.*epochs"):
        cfg.check_overrides({"epoch": 3}, ["01_classifier"])
    with pytest.raises(config.ConfigError, match="must be int"):
        cfg.parameters("ci", "01_classifier", {"epochs": 2.5})
    assert cfg.parameters("ci", "01_classifier", {"epochs": 3})["epochs"] == 3


def test_overrides_parse_as_yaml():
    assert config.parse_value("3") == 3 and config.parse_value("0.5") == 0.5
    assert config.parse_value("null") is None and config.parse_value("cifar10") == "cifar10"


def test_notebook_lacking_shared_parameters_is_rejected(tmp_path):
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    shutil.copy(config.NOTEBOOKS_DIR / "01_classifier.md", nb_dir / "01_classifier.md")
    from tests.notebook_factory import write_notebook

    write_notebook(nb_dir / "02_bad.md", "profile = 'cpu'\nseed = 0", "pass")
    with pytest.raises(config.ConfigError, match="02_bad.md lacks device"):
        config.load(config.CONFIG_PATH, nb_dir)

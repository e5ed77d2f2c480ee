rule synth_data:
    output:
        train_ann=os.path.join(P("synth"), "instances_train.json"),
        val_ann=os.path.join(P("synth"), "instances_val.json"),
        test_ann=os.path.join(P("synth"), "instances_test.json"),
        train_images=directory(os.path.join(P("synth"), "train")),
        val_images=directory(os.path.join(P("synth"), "val")),
        test_images=directory(os.path.join(P("synth"), "test")),
    params:
        config=get_config_path,
        out_dir=out_dir("train_ann"),
        digest=get_params("synth"),
    log:
        log_path("synth"),
    benchmark:
        bench_path("synth")
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
        gpu=0,
    conda:
        "../envs/detprune.yaml"
    shell:
        CMD["synth"]


rule synth_cls_data:
    output:
        train=directory(os.path.join(P("synth_cls"), "train")),
        val=directory(os.path.join(P("synth_cls"), "val")),
        test=directory(os.path.join(P("synth_cls"), "test")),
    params:
        config=get_config_path,
        out_dir=out_dir("train"),
        digest=get_params("synth"),
    log:
        log_path("synth_cls"),
    benchmark:
        bench_path("synth_cls")
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
        gpu=0,
    conda:
        "../envs/detprune.yaml"
    shell:
        CMD["synth"]


# COCO / VOC: a `tune` split of data.coco.tune_images images carved from the training
# set (choices are made on it); the model trains on the rest, results are reported on
# the config's val_ann (val2017, VOC07 test), the `test` split.
rule carve_split:
    input:
        ann=get_carve_input,
    output:
        train=P("carved", part="train"),
        tune=P("carved", part="tune"),
    params:
        size=lambda w: get_carve_params(w)["size"],
        seed=lambda w: get_carve_params(w)["seed"],
        digest=get_params("carve"),
    log:
        log_path("carve"),
    benchmark:
        bench_path("carve")
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
        gpu=0,
    conda:
        "../envs/detprune.yaml"
    shell:
        CMD["carve"]


rule check_data:
    input:
        unpack(get_split_data),
    output:
        report=P("check"),
    log:
        log_path("check_{split}"),
    benchmark:
        bench_path("check_{split}")
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
        gpu=0,
    conda:
        "../envs/detprune.yaml"
    shell:
        CMD["check"]


# Smoke run of the paper profile (--config smoke=true): the datasets, unless their roots
# are given, are a fixture laid out as the paper profile reads them (detprune.smoke).
if config.get("smoke"):
    _FIXTURE = SMOKE.fixture_roots(config["results"])

    rule smoke_coco:
        output:
            train_ann=f"{_FIXTURE['coco_root']}/annotations/instances_train2017.json",
            val_ann=f"{_FIXTURE['coco_root']}/annotations/instances_val2017.json",
            train_images=directory(f"{_FIXTURE['coco_root']}/train2017"),
            val_images=directory(f"{_FIXTURE['coco_root']}/val2017"),
        threads: 1
        resources:
            gpu=0,
        run:
            SMOKE.write_fixture("coco", _FIXTURE["coco_root"])

    rule smoke_voc:
        output:
            train_ann=f"{_FIXTURE['voc_root']}/voc0712_trainval.json",
            test_ann=f"{_FIXTURE['voc_root']}/voc07_test.json",
            images=directory(f"{_FIXTURE['voc_root']}/JPEGImages"),
        threads: 1
        resources:
            gpu=0,
        run:
            SMOKE.write_fixture("voc", _FIXTURE["voc_root"])

    rule smoke_imagenet:
        output:
            train=directory(f"{_FIXTURE['imagenet_root']}/train"),
            val=directory(f"{_FIXTURE['imagenet_root']}/val"),
        threads: 1
        resources:
            gpu=0,
        run:
            SMOKE.write_fixture("imagenet", _FIXTURE["imagenet_root"])

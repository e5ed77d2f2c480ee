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

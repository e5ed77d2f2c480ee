rule synth_data:
    output:
        train_ann=os.path.join(P("synth"), "instances_train.json"),
        val_ann=os.path.join(P("synth"), "instances_val.json"),
        train_images=directory(os.path.join(P("synth"), "train")),
        val_images=directory(os.path.join(P("synth"), "val")),
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

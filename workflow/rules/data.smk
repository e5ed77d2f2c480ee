rule synth_data:
    output:
        train_ann=W.dataset_paths({**config, "data": {"source": "synth"}})["train_ann"],
        val_ann=W.dataset_paths({**config, "data": {"source": "synth"}})["val_ann"],
        train_images=directory(W.dataset_paths({**config, "data": {"source": "synth"}})["train_images"]),
        val_images=directory(W.dataset_paths({**config, "data": {"source": "synth"}})["val_images"]),
    params:
        config=CONFIG_PATH,
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
        W.COMMANDS["synth"]


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
        W.COMMANDS["check"]

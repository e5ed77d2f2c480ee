rule pretrain_backbone:
    output:
        model="{pdir}/{backbone}.pt",
        meta="{pdir}/{backbone}.json",
    params:
        config=get_pretrain_config,
    log:
        "{pdir}/logs/{backbone}.log",
    benchmark:
        "{pdir}/benchmarks/{backbone}.tsv"
    threads: W.stage_threads(config, "train")
    resources:
        mem_mb=4000,
        runtime=6 * 60,
        gpu=1,
    conda:
        "../envs/detprune.yaml"
    shell:
        CMD["pretrain"]


rule train_baseline:
    input:
        unpack(get_train_data),
        unpack(get_backbone_init),
        checks=expand(P("check"), split=W.SPLITS, allow_missing=True),
    output:
        model=P("baseline"),
    params:
        config=get_config_path,
        digest=get_params("train"),
    log:
        log_path("train/seed{seed}"),
    benchmark:
        bench_path("train/seed{seed}")
    threads: W.stage_threads(config, "train")
    resources:
        mem_mb=8000,
        runtime=24 * 60,
        gpu=1,
    conda:
        "../envs/detprune.yaml"
    shell:
        CMD["train"]

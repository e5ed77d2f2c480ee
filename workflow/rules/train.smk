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
    wildcard_constraints:
        results=TRAINED_RESULTS,
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


# `model.checkpoint` set: the baseline is the given detector's weights, never trained
rule import_baseline:
    wildcard_constraints:
        results=IMPORTED_RESULTS,
    input:
        weights=get_weights,
        train_ann=lambda wildcards: get_train_data(wildcards)["train_ann"],
        checks=expand(P("check"), split=W.SPLITS, allow_missing=True),
    output:
        model=P("baseline"),
    params:
        config=get_config_path,
        digest=get_params("import"),
    log:
        log_path("import/seed{seed}"),
    benchmark:
        bench_path("import/seed{seed}")
    resources:
        mem_mb=8000,
    conda:
        "../envs/detprune.yaml"
    shell:
        CMD["import"]

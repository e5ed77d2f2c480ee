rule finetune:
    input:
        unpack(get_train_data),
        model=P("pruned"),
        teacher=P("baseline"),
    output:
        model=P("finetuned"),
    params:
        config=get_config_path,
        method="{method}",
        digest=get_params("finetune"),
    log:
        log_path("finetune/{method}_flops{pct}"),
    benchmark:
        bench_path("finetune/{method}_flops{pct}")
    threads: W.stage_threads(config, "finetune")
    resources:
        mem_mb=8000,
        runtime=24 * 60,
        gpu=1,
    conda:
        "../envs/detprune.yaml"
    shell:
        CMD["finetune"]

rule prune:
    input:
        unpack(get_train_data),
        model=get_prune_source,
    output:
        model=P("pruned"),
        summary=P("prune_summary"),
    params:
        config=get_config_path,
        method="{method}",
        flops=get_flops,
        digest=get_params("prune"),
    log:
        log_path("prune/{method}_flops{pct}/seed{seed}"),
    benchmark:
        bench_path("prune/{method}_flops{pct}/seed{seed}")
    threads: W.stage_threads(config, "prune")
    resources:
        mem_mb=8000,
        runtime=6 * 60,
        gpu=1,
    conda:
        "../envs/detprune.yaml"
    shell:
        CMD["prune"]

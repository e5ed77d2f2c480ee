# Fine-tuning of a pruned model; finetune_distill: the same stage for methods that
# distill from the unpruned teacher (SAD, LCP's loss), so distillation shows in the DAG
# as its own rule with its own logs and benchmarks.
rule finetune:
    wildcard_constraints:
        method=METHOD_PLAIN,
    input:
        unpack(get_train_data),
        model=P("pruned"),
        teacher=get_teacher,
    output:
        model=P("finetuned"),
    params:
        config=get_config_path,
        method="{method}",
        digest=get_params("finetune"),
    log:
        log_path("finetune/{method}_flops{pct}/seed{seed}"),
    benchmark:
        bench_path("finetune/{method}_flops{pct}/seed{seed}")
    threads: W.stage_threads(config, "finetune")
    resources:
        mem_mb=8000,
        runtime=24 * 60,
        gpu=1,
    conda:
        "../envs/detprune.yaml"
    shell:
        CMD["finetune"]


use rule finetune as finetune_distill with:
    wildcard_constraints:
        method=METHOD_DISTILLED,
    log:
        log_path("finetune_distill/{method}_flops{pct}/seed{seed}"),
    benchmark:
        bench_path("finetune_distill/{method}_flops{pct}/seed{seed}")

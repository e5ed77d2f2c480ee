rule evaluate_baseline:
    input:
        unpack(get_test_data),
        model=P("baseline"),
    output:
        metrics=P("metrics_baseline"),
    params:
        config=get_config_path,
        method="baseline",
        flops=1.0,
        digest=get_params("evaluate"),
    log:
        log_path("evaluate_baseline/seed{seed}"),
    benchmark:
        bench_path("evaluate_baseline/seed{seed}")
    threads: W.stage_threads(config, "evaluate")
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=1,
    conda:
        "../envs/detprune.yaml"
    shell:
        CMD["evaluate"]


rule evaluate_pruned:
    input:
        unpack(get_test_data),
        model=P("finetuned"),
    output:
        metrics=P("metrics"),
    params:
        config=get_config_path,
        method="{method}",
        flops=get_flops,
        digest=get_params("evaluate"),
    log:
        log_path("evaluate/{method}_flops{pct}/seed{seed}"),
    benchmark:
        bench_path("evaluate/{method}_flops{pct}/seed{seed}")
    threads: W.stage_threads(config, "evaluate")
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=1,
    conda:
        "../envs/detprune.yaml"
    shell:
        CMD["evaluate"]


# `evaluate.export: onnx`: every evaluated checkpoint to an ONNX file beside it (the dense
# network, checked by ONNX Runtime on test images; `detprune export`)
rule export_onnx:
    input:
        unpack(get_test_data),
        model="{results}/models/{stem}.pt",
    output:
        onnx="{results}/models/{stem}.onnx",
        report="{results}/models/{stem}.onnx.json",
    wildcard_constraints:
        stem=r"(baseline|finetuned/[a-z][a-z0-9_-]*/flops[0-9.]+)/seed[0-9]+",
    params:
        digest=get_params("export"),
    log:
        log_path("export_onnx/{stem}"),
    benchmark:
        bench_path("export_onnx/{stem}")
    threads: W.stage_threads(config, "evaluate")
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../envs/detprune.yaml"
    shell:
        CMD["export"]


# the timing step (`evaluate.latency`): every evaluated checkpoint of a seed, timed one
# after the other in one job that shares the CPU with no other job (timing_threads)
rule time_latency:
    input:
        unpack(get_test_data),
        metrics=get_seed_metrics,
    output:
        latency=P("latency", name=config["report"]["name"]),
    params:
        config=get_config_path,
        digest=get_params("latency"),
    log:
        log_path(f"time_latency/{config['report']['name']}/seed{{seed}}"),
    benchmark:
        bench_path(f"time_latency/{config['report']['name']}/seed{{seed}}")
    threads: timing_threads
    resources:
        mem_mb=4000,
        runtime=60,
        gpu=1,
    conda:
        "../envs/detprune.yaml"
    shell:
        CMD["latency"]

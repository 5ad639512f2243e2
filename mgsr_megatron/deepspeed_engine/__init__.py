"""The DeepSpeed engine: distill Hugging Face models directly under ZeRO-1/2/3 (issue 17, first slice).

    deepspeed:            # in the YAML config (or: mgsr train --config X.yaml --deepspeed ds.json)
      enabled: true
      zero_stage: 3       # 1 | 2 | 3
      teacher_zero3: true # partition the frozen teacher too (else one replica per rank)
    student: {load: hf/student, params_dtype: bfloat16}
    teacher: {load: hf/teacher}

Teacher and student are Hugging Face directories (config.json + safetensors), loaded with
`trust_remote_code=False`; the data pipeline (training/data.py), the losses (losses.mgsr_objective on its
dense path), the LR schedule (training/optimizer.py), the ClipNet, metrics and the checkpoint layout
conventions are the Megatron engine's. Data parallel only; the Megatron engine's data schedules (ground truth,
on_policy and off_policy with SCRG, seqkd), generating through generation/hf_stage.py.

    settings.py    config checks before anything runs, the DeepSpeed config, model directories
    runtime.py     process start-up without compiling DeepSpeed ops (shm op off, stale-lock check)
    models.py      HF models replicated or ZeRO-3-partitioned at load; export to an HF directory
    engine.py      DeepSpeedTrainer: one training step, validation loss
    checkpoint.py  DeepSpeed's checkpoint + the project's state, atomic, `--resume auto`
    run.py         the training loop (`mgsr train` dispatches here)
"""

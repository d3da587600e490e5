"""Chinese help lines of the config keys the Train tab generates from the registry (a method's or a
stage's own options, webui/options.py): key -> the registry's English help (config.py,
adapter_methods.py, train/stages) in Chinese, written from it by hand. Key names, technical names
and numbers stay as they are. The range the registry gives (`bounds`) is appended by
`options.key_help`, not written here. tests/webui/test_webui_more.py fails, naming the key, when a
key the page can show has no line here."""

from __future__ import annotations

KEY_HELP_ZH: dict[str, str] = {
    # shared finetune keys (config.py)
    "lora_target": "应用 LoRA 的模块：'all'（除输出头外的所有线性层）或逗号分隔的模块名，如 q_proj,v_proj。",
    "additional_target": "逗号分隔的额外模块，全量训练并随适配器一起保存。",
    "lora_dropout": "LoRA 输入上的 dropout。",
    "use_rslora": "秩稳定 LoRA（rsLoRA）：scaling = alpha / sqrt(r)。",
    "use_dora": "权重分解 LoRA（DoRA）：每个输出行一个可训练的幅值，乘以 W + scaling * B @ A 归一化后的方向。",
    "pissa_init": "PiSSA：用每个被适配权重的主奇异向量初始化适配器，并在残差权重上训练（内存中的基座权重会改变）。",
    "pissa_iter": "PiSSA：快速随机 SVD 的幂迭代次数；-1 = 精确的完整 SVD。",
    "pissa_convert": "PiSSA：训练结束时写出 output_dir/pissa_init（初始适配器）、pissa_backup（训练后的 PiSSA 适配器，"
                     "对应残差基座）和 pissa_converted，并把 output_dir 中的适配器换成转换后的版本：适用于原始模型的"
                     "普通 LoRA，秩为 2 x lora_rank，因此用原始 model_name_or_path 对话 / 导出结果正确。",
    "loraplus_lr_ratio": "LoRA+：LoRA 的 B 矩阵（及偏置）的学习率为 learning_rate x 该比例（如 16）；留空 = 关闭。",
    "loraplus_lr_embedding": "LoRA+：嵌入层上 LoRA 的 B 矩阵的学习率。",
    "loftq_iter": "QLoRA：LoftQ 迭代次数（需配合 quantization_bit）。适配器的初始值使量化基座 + 适配器逼近原始权重；0 = 关闭。",
    "create_new_adapter": "配合 adapter_name_or_path：把列出的所有适配器合并进模型并训练一个新适配器"
                          "（默认：合并除最后一个外的全部，继续训练最后一个）。",
    "freeze_trainable_layers": "freeze：训练最后（正数）或最前（负数）多少个解码层。",
    "freeze_trainable_modules": "freeze：这些层中参与训练的模块名（逗号分隔），或 'all'。",
    # method keys (adapter_methods.METHOD_KEYS)
    "lora_rank_pattern": "分布式 LoRA：按层或模块指定秩，{entry: rank}；entry 为层号（5）、闭区间（'0-7'）或匹配模块名结尾的"
                         "正则（'.*mlp.*'）；第一个匹配的条目生效。其他模块：lora_rank。lora_alpha 留空：每个模块 alpha = 2 x 其秩。",
    "lora_rank_schedule": "按深度分布 LoRA 秩：'linear 4->16' 或 'cosine 4->16'（第一层的秩 -> 最后一层的秩），四舍五入取整；"
                          "lora_rank_pattern 和 lora_rank_levels 的条目优先于它。",
    "lora_rank_levels": "分层 LoRA：按层级指定秩，如 {embed: 4, attn: 8, mlp: 16, head: 4}；attn：每层注意力块中的模块，"
                        "mlp：该层的其他模块，embed / head：输入嵌入 / 输出头（加入被适配模块）。attn / mlp 也接受深度渐变"
                        "（'linear 8->16'）或 {层范围: 秩}。",
    "ensemble": "LoRA 集成：各成员都是同一组层上的 LoRA，如 [{r: 4}, {r: 16, lora_alpha: 32}]；成员可设 r 和 lora_alpha"
                "（默认：lora_alpha，否则 2 r）。留空：[{r: 4}, {r: 16}]。",
    "ensemble_weights": "LoRA 集成：W0 + sum w_i B_i A_i 中的成员权重 w_i：留空（均为 1：各成员之和）、数字列表（固定），"
                        "或 learn（每个成员每层一个可训练权重，初始为 1）。",
    "dynamic_rank": "动态 LoRA（DyLoRA）：{min: 2, max: 16, schedule: linear}；秩在训练前 `until`（默认 1.0）比例内从 min 增长到 max，"
                    "schedule 为 linear（每个秩步数相同）、cosine 或 constant（一开始即为 max：论文中的 DyLoRA）；每步训练从"
                    " [min, 已达到的秩] 中抽取的秩（sample: true）或已达到的秩（sample: false）；save：保存适配器时的秩"
                    "（默认 max）。留空：{min: 1, max: 8}。",
    "multitask_rank": "多任务 LoRA：每个任务专属部分的秩（共享部分的秩为 lora_rank）。",
    "multitask_alpha": "多任务 LoRA：每个任务部分的 lora_alpha（缩放为 multitask_alpha / multitask_rank）；留空：与共享部分"
                       "相同的缩放 lora_alpha / lora_rank（lora_alpha 也留空时即 2 x multitask_rank）。",
    "rank_dropout": "loha / lokr：训练时以该概率把权重更新的每个输出行置零（peft 的 rank_dropout）。",
    "module_dropout": "loha / lokr：训练时以该概率在某一步跳过某层的整个适配器（peft 的 module_dropout）；oft：训练时"
                      "每层中作为恒等映射的块的比例。",
    "rank_dropout_scale": "lokr：把 rank_dropout 保留的行按 1 / (保留比例) 重新缩放（loha 总是如此）。",
    "decompose_both": "lokr：把较小的 Kronecker 因子也写成秩为 lora_rank 的乘积。",
    "decompose_factor": "lokr：把每个权重维度拆成 (factor, dim / factor)；-1：因子尽量接近平方。",
    "vera_rank": "VeRA：共享随机投影的秩 r（peft 默认 256；VeRA 每层只训练 r + out 个值，所以远高于 LoRA 的秩也很便宜）。",
    "vera_d_initial": "VeRA：lambda_d 向量的初始值（lambda_b 从 0 开始）。",
    "vera_dropout": "VeRA：训练时适配器输入上的 dropout。",
    "vera_projection_prng_key": "VeRA：共享随机投影的随机种子。",
    "bitfit_target": "BitFit：训练哪些偏置：'all'（除输出头外的所有线性层及所有 LayerNorm）、'attention'、'mlp'，或逗号分隔的"
                     "模块名，如 q_proj,v_proj。没有偏置的层会得到一个零偏置。",
    "oft_rank": "OFT：每个被适配层的块数（in_features = oft_rank x oft_block_size）；0：由 oft_block_size 决定。两者中恰好"
                "设置一个非零值（只设 oft_rank 时 oft_block_size 视为 0）。",
    "oft_block_size": "OFT：每个正交块的大小；0：由 oft_rank 决定。不能整除层宽度的大小会移到最近的因数（与 peft 相同）。",
    "oft_target": "OFT：应用 OFT 的模块：'all'（除输出头外的所有线性层）或逗号分隔的模块名；留空：lora_target。",
    "boft_block_size": "BOFT：每个正交块的大小；0：由 boft_block_num 决定。两者中恰好设置一个非零值"
                       "（只设 boft_block_num 时 boft_block_size 视为 0）。",
    "boft_block_num": "BOFT：每个蝶形因子的块数（in_features = boft_block_num x boft_block_size）；0：由 boft_block_size 决定。",
    "boft_n_butterfly_factor": "BOFT：每个旋转的蝶形因子数（1：一个块对角旋转）。",
    "num_virtual_tokens": "适配器在每个输入前（prompt）或每个注意力层前（prefix）加入的虚拟 token 数。",
    "prompt_tuning_init": "prompt 的初始化方式：random、sample_vocab（随机 token 的嵌入）或 text（prompt_tuning_init_text 的嵌入）。",
    "prompt_tuning_init_text": "用其 token 嵌入初始化 prompt 的文本（prompt_tuning_init: text），按 num_virtual_tokens 重复或截断。",
    "prefix_projection": "通过 MLP 训练 prefix（保存时折叠进 prefix）；finetuning_type: ptuning_v2 即不带它的 prefix tuning。",
    "prefix_init": "prefix 的初始化方式：zero（键和值为零）或 random（peft 的默认，N(0, 1)：开始时远离基座模型）。",
    "encoder_hidden_size": "prefix MLP / P-tuning prompt 编码器的隐藏层大小；留空：模型的（键/值）宽度。",
    "encoder_reparameterization_type": "P-tuning 的 prompt 编码器：MLP 或 LSTM。",
    "adapter_type": "瓶颈适配器的位置：houlsby（注意力输出投影之后和前馈块之后）、pfeiffer（仅前馈块之后）、parallel"
                    "（与前馈块并联，作用于其输入，按 adapter_scaling 缩放）。lora_target 不为 'all' 时改为指定这些模块。",
    "adapter_size": "瓶颈宽度：适配器把隐藏维度投影到这个大小。",
    "adapter_act": "适配器两个投影之间的非线性激活函数。",
    "adapter_scaling": "适配器输出的系数；留空：方法自身的默认值（bottleneck 1，同 Houlsby 和 Pfeiffer；mam 4，"
                       "He et al. 的并联适配器；unipelt 1）。",
    "init_r": "AdaLoRA：每个被适配矩阵的初始秩。",
    "target_r": "AdaLoRA：预算最终降到的平均秩（总秩 target_r x 被适配矩阵数）。",
    "tinit": "AdaLoRA：开始裁剪秩之前的预热步数。",
    "tfinal": "AdaLoRA：最后以固定秩分布训练的步数。",
    "deltaT": "AdaLoRA：两次预算分配之间的步数。",
    "beta1": "AdaLoRA：敏感度 |w * grad| 的 EMA 系数。",
    "beta2": "AdaLoRA：不确定度的 EMA 系数。",
    "orth_reg_weight": "AdaLoRA：加到损失上的正交正则项的权重。",
    "total_step": "AdaLoRA：预算调度的步数；留空：本次训练的优化器步数。",
    "adaptive": "自适应 LoRA：moe（配合 finetuning_type: lora）在每层训练一组 LoRA 专家，由路由器按 token 混合"
                "（等同 finetuning_type: lora_moe）。AdaLoRA 的预算秩请用 finetuning_type: adalora。",
    "num_experts": "自适应（MoE）LoRA：每个被适配层的 LoRA 专家数，每个专家的秩为 lora_rank。",
    "moe_top_k": "自适应（MoE）LoRA：每个 token 使用的专家数；其路由权重重新归一化为和为 1。不超过 num_experts。"
                 "lora_moe 配置未设置 moe_top_k 时，top_k 即指它（采样保留其默认 top_k）。",
    "router_aux_loss_coef": "自适应（MoE）LoRA：路由器负载均衡损失（num_experts x sum_e f_e P_e，Switch Transformer / Mixtral，"
                            "对被适配层取平均）在训练损失中的权重；0：关闭。",
    # stage keys (train/stages)
    "dynamic_mask_ratio": "stage: sft：动态掩码微调：训练批次中被替换为分词器 mask token（否则 unk，否则 pad）的 prompt token"
                          "（无标签、非特殊 token）比例，每轮重新抽取；标签不变。0：关闭。",
    "use_dft_loss": "stage: sft：DFT，动态微调（Wu et al. 2025）：每个回复 token 的交叉熵按模型对它的概率加权"
                    "（权重不回传梯度）。与 LLaMA-Factory 相同。",
    "use_eaft_loss": "stage: sft：EAFT：每个回复 token 的交叉熵按 (top-20 softmax 的熵 / 3) ** eaft_alpha 加权。"
                     "与 LLaMA-Factory 相同。",
    "eaft_alpha": "stage: sft 且 use_eaft_loss：EAFT 权重的指数。",
    "use_asft_loss": "stage: sft：ASFT：DFT 损失加上 asft_alpha x KL(训练前的模型 || 模型)，按回复 token 计算；"
                     "参考模型是关闭适配器的模型（full / freeze：一份冻结的副本）。与 LLaMA-Factory 相同。",
    "asft_alpha": "stage: sft 且 use_asft_loss：KL 项的权重。",
    "pref_beta": "偏好训练阶段：beta，偏好损失的强度（DPO 的 beta、IPO 的 tau、ORPO 的 lambda、SimPO 的 beta；KTO 的 beta）。",
    "pref_loss": "stage: dpo：偏好损失：sigmoid（DPO）、ipo、hinge、orpo 或 simpo（orpo 和 simpo 不需要参考模型）。",
    "pref_ftx": "偏好训练阶段：加到偏好损失上的 SFT 损失（chosen 回复的逐 token NLL；kto：每个期望回复的）权重。",
    "simpo_gamma": "stage: dpo 且 pref_loss: simpo：目标奖励间隔 gamma。",
    "kto_chosen_weight": "stage: kto：期望回复（kto_tag 为 true）损失的权重。",
    "kto_rejected_weight": "stage: kto：非期望回复（kto_tag 为 false）损失的权重。",
    "num_labels": "stage cls / semi 的类别数；0 表示从数据中统计（id：最大值 + 1；名称：不同名称的个数）。",
    "label_column": "stage cls / semi 的类别标签列（从 0 开始的 id，或名称；名称按排序映射为 id）。",
    "unlabeled_dataset": "stage: semi：逗号分隔的无标签文本数据集名（dataset_info.json），用于伪标注（其中的标签列只作为"
                         "金标准用于报告）。",
    "pseudo_label_threshold": "stage: semi：模型最高类别概率不低于该值时，无标签样本加入训练数据。",
    "semi_rounds": "stage: semi：仅用有标签数据训练之后的伪标注轮数（每轮预测无标签集并继续训练）。",
    "teacher_model": "stage: kd：教师模型，取值同 model_name_or_path 的模型文件夹或 Hub 名称（留空：默认模型）；"
                     "必须与学生模型共用分词器。",
    "teacher_adapter": "stage: kd：加到教师模型上的 LoRA（或其他适配器）文件夹（如一次 sft 训练的 output_dir）。"
                       "留空：教师模型保持原样。",
    "kd_alpha": "stage: kd：蒸馏项的权重：loss = kd_alpha * T^2 * D(teacher || student) + (1 - kd_alpha) * 标签上的 CE。",
    "kd_temperature": "stage: kd：比较前软化两个分布的温度 T（Hinton et al. 2015）。",
    "kd_loss": "stage: kd：散度 D：forward_kl（KL(teacher || student)，Hinton）、reverse_kl（KL(student || teacher)，MiniLLM）"
               "或 jsd（GKD 的广义 Jensen-Shannon，kd_jsd_beta）。",
    "kd_jsd_beta": "stage: kd 且 kd_loss: jsd：教师的混合权重 beta（GKD / TRL 的 beta；0.5：对称 JSD）。",
    "num_generations": "stage: grpo：每个 prompt 生成的补全数（组大小 G；至少 2）。",
    "reward_funcs": "stage: grpo：奖励函数，一个名称或列表：exact_match（补全 == 记录中的回复）、length（1 / (1 + tokens)："
                    "越短越好）、ends_with=WORD、token_share=ID，或 Python 的 module:function，调用方式为"
                    " f(prompts, completions, **columns) -> list[float]。",
    "reward_weights": "stage: grpo：每个奖励函数一个权重（默认：全为 1）。",
    "max_completion_length": "stage: grpo 和 ppo：每个补全最多生成的 token 数。",
    "grpo_beta": "stage: grpo：相对参考模型（禁用适配器的模型）的 KL 系数；0：不做参考前向（TRL 的 beta）。",
    "epsilon": "stage: grpo：策略比率的裁剪范围。",
    "loss_type": "stage: grpo：grpo（对每个补全的 token 取平均）或 dr_grpo（对其 token 求和 / max_completion_length）。",
    "reward_model": "stage: ppo：奖励模型，一次 stage: rm 训练的输出文件夹（带 value_head.safetensors 的适配器，或完整模型）。",
    "reward_model_type": "stage: ppo：lora（reward_model 是本次训练基座模型上的适配器）或 full（完整模型文件夹）；不支持 api。",
    "ppo_epochs": "stage: ppo：每个 rollout 的遍历次数（每次遍历是一个训练步）。",
    "ppo_buffer_size": "stage: ppo：每个 rollout 的小批次数（只能为 1：一个 rollout 是一个 prompt 微批次）。",
    "ppo_target": "stage: ppo：自适应 KL 系数的目标 KL。",
    "ppo_score_norm": "stage: ppo：用奖励模型分数的滑动均值和标准差对其归一化。",
    "ppo_whiten_rewards": "stage: ppo：在 GAE 之前对逐 token 奖励做白化。",
}

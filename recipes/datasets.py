"""The papers' system prompts and their dataset and benchmark presets (`--dataset NAME`, `--eval-dataset NAME`,
evaluate.py --benchmarks): data, read by data.load_preset only when a run names a preset."""

PROMPTS = {  # system prompts of the papers, as in their official code
    # Qwen2.5-Math chain-of-thought evaluation prompt; understand-r1-zero's qwen_math template
    "qwen_math": "Please reason step by step, and put your final answer within \\boxed{}.",
    # prompt[0] of Elliott/Openr1-Math-46k-8192 (the LUFFY-family verl preprocessing)
    "luffy": ("Your task is to follow a systematic, thorough reasoning process before providing the final solution. "
              "This involves analyzing, summarizing, exploring, reassessing, and refining your thought process through "
              "multiple iterations. Structure your response into two sections: Thought and Solution. In the Thought "
              "section, present your reasoning using the format: \"<think>\n {thoughts} </think>\n\". Each thought "
              "should include detailed analysis, brainstorming, verification, and refinement of ideas. After "
              "\"</think>\n,\" in the Solution section, provide the final, logical, and accurate answer, clearly "
              "derived from the exploration in the Thought section. If applicable, include the answer in \\boxed{} for "
              "closed-form results like multiple choices or mathematical solutions."),
    # Trinity-RFT examples/mix_chord/get_openr1_data.py SYSTEM_PROMPT
    "chord": ("You are a helpful assistant that solves MATH problems. You should first thinks about the reasoning "
              "process in mind and then provides the user with the answer. You should present your reasoning process "
              "using the format: <think>\n ...your reasoning process here... </think>\n first. You should always "
              "include your final answer in \\boxed{} as closed-form results."),
}


# name -> hub dataset and split; fields: a column, "a.0.b" for nested fields and list items, "boxed:COL" for the last
# \boxed{} of a column, or a function of the row; system prompt (text, or system_field); row filter (keep, with the
# columns it reads in needs); answer_format: where the completions' final answer is read (rollout.ANSWER_FORMATS).
# `--dataset NAME:FILE` reads a local .jsonl/.parquet copy through the same code (data.load_preset).
def _bench(hub, split, prompt, answer):  # benchmarks: the Qwen2.5-Math CoT prompt, as the DFT and Dr. GRPO evaluations
    return dict(hub=hub, split=split, prompt=prompt, answer=answer, system=PROMPTS["qwen_math"],
                answer_format="boxed")


_MATH = dict(hub="DigitalLearningGmbH/MATH-lighteval", split="train", prompt="problem", response="solution",
             answer="boxed:solution", system=PROMPTS["qwen_math"], answer_format="boxed")
DATASETS = {
    # DFT: raw problem in the chat template, solution + EOS (numina_cot.py)
    "numina_cot": dict(hub="AI-MO/NuminaMath-CoT", split="train", prompt="problem", response="solution",
                       answer="boxed:solution", answer_format="boxed"),
    # LUFFY / ReLIFT / Prefix-RFT: verl rows, system prompt in prompt[0], R1 demonstration in target
    "openr1_46k": dict(hub="Elliott/Openr1-Math-46k-8192", split="train", prompt="prompt.-1.content",
                       response="target.0.content", answer="reward_model.ground_truth",
                       system_field="prompt.0.content", answer_format="boxed"),
    # CHORD's SFT and RL sets (openr1_chord_sft, openr1_chord_rl): in recipes/chord.py with their filters
    # DAPO: the "Answer:" instruction is part of each prompt
    "dapo_math_17k": dict(hub="BytedTsinghua-SIA/DAPO-Math-17k", split="train", prompt="prompt.0.content",
                          answer="reward_model.ground_truth", answer_format="answer_line"),
    # Dr. GRPO: MATH level 3-5 with the Qwen-Math template; MATH train (all levels)
    "math_lvl3to5": dict(_MATH, needs=("level",), keep=lambda r: r["level"] in ("Level 3", "Level 4", "Level 5")),
    "math_train": _MATH,
    "math500": _bench("HuggingFaceH4/MATH-500", "test", "problem", "answer"),
    "aime24": _bench("HuggingFaceH4/aime_2024", "train", "problem", "answer"),
    "aime25": _bench("math-ai/aime25", "test", "problem", "answer"),
    "amc23": _bench("math-ai/amc23", "test", "question", "answer"),
    "minerva": _bench("math-ai/minervamath", "test", "question", "answer"),
    "olympiadbench": _bench("math-ai/olympiadbench", "test", "question", "final_answer.0"),  # a list of one answer
}

"""Several reward models, Llama 2 style: the helpfulness/safety combination and its `ppo` options."""
import math

import pytest
import torch

from gptlab.errors import GptlabError
from gptlab.train.ppo import parse_reward_models
from gptlab.train.rl import llama2_combine


def test_llama2_picks_the_safety_score_exactly_when_flagged_or_unsafe():
    at = math.log(0.15 / 0.85)                 # sigmoid(at) == 0.15: the threshold itself
    helpful = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    safety = torch.tensor([0.5, at - 1e-3, at + 1e-3, -9.0, 3.0])
    flagged = torch.tensor([False, False, False, True, True])
    combined, used = llama2_combine(helpful, safety, flagged, 0.15)
    # unflagged & safe -> help; unflagged & just below 0.15 -> safety; just above -> help; flagged -> safety
    assert used.tolist() == [0.0, 1.0, 0.0, 1.0, 1.0]
    assert combined.tolist() == pytest.approx([1.0, at - 1e-3, 3.0, -9.0, 3.0])
    # A threshold of 0 never overrides helpfulness on an unflagged prompt.
    assert llama2_combine(helpful, safety, torch.zeros(5, dtype=torch.bool), 0.0)[1].sum() == 0


def test_reward_models_spec():
    assert parse_reward_models("help=a,safety=b") == {"help": "a", "safety": "b"}
    for bad in ("help=a", "a,b", "help=a,safety=", "helpful=a,safety=b"):
        with pytest.raises(GptlabError, match="--reward-models"):
            parse_reward_models(bad)


def test_ppo_reward_models_need_combine(tmp_path, small_tokenizer, capsys):
    from conftest import user_error
    from test_sft import make_run
    init = make_run(tmp_path / "sft", small_tokenizer)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"messages": [{"role": "user", "content": "hi"}], "family": "decline", "answer": "x"}\n')
    err = user_error(capsys, "ppo", "--init", init, "--reward-models", f"help={init},safety={init}", "--prompts",
                     prompts, "--out", tmp_path / "o")
    assert "--combine llama2" in err
    err = user_error(capsys, "ppo", "--init", init, "--combine", "llama2", "--reward-model", init, "--prompts",
                     prompts, "--out", tmp_path / "o")
    assert "--reward-models help=RUN,safety=RUN" in err


def test_rm_family_selection_for_separate_reward_models():
    from gptlab.data.formats import Ranking
    from gptlab.train.reward import select_families
    rs = [Ranking([{"role": "user", "content": f"q{i}"}], ["a", "b"], [0, 1], {"family": f})
          for i, f in enumerate(["decline"] * 5 + ["arithmetic"] * 200)]
    assert len(select_families(rs, None, None)) == 205
    safety = select_families(rs, "decline", None, other_fraction=0.1)
    assert sum(r.meta["family"] == "decline" for r in safety) == 5 and 5 < len(safety) - 5 < 40
    helpful = select_families(rs, None, "decline")
    assert len(helpful) == 200 and all(r.meta["family"] != "decline" for r in helpful)
    with pytest.raises(GptlabError, match="no rankings"):
        select_families(rs, "translate", None)

"""When a coded round may declare its silent workers stragglers: the silence rule and the SGC
authors' (1 + mu) x fastest rule (strategy.straggler_rule)."""

from raylane.strategies.gradient_coding.patience import Patience


def test_silence_rule_waits_while_answers_keep_coming():
    p = Patience("silence", mu=0.5)
    assert not p.out(100.0), "no answer yet: nobody is a straggler"
    p.answered(1.0)                     # first answer at 1 s: patience 0.5 s after each answer
    assert not p.out(1.4) and p.out(1.5)
    p.answered(1.4)                     # a slower worker answers: the round stays open
    assert not p.out(1.8) and p.out(1.9)


def test_fastest_rule_declares_whoever_is_slower_than_1_plus_mu_times_the_first():
    p = Patience("fastest", mu=0.5)
    p.answered(1.0)
    p.answered(1.4)                     # later answers do not move the cut-off
    assert not p.out(1.49) and p.out(1.5)
    assert p.first == 1.0 and p.until == 1.5

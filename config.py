"""Default bit-widths of QuantDiT.py and sample_merge_TAS.py (edit these, or pass --weight-bit /
--act-bit: the flags override them). Only argparse defaults live here: the quantizer receives
its settings as a QuantConfig, never from this module."""

global_act_bit = 8
global_weight_bit = 4
# Weight-only bits of the adaLN modulation layers (None: floating point, as in the paper).
global_adaln_bit = None

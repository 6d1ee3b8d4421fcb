"""Training objectives (registered in OBJECTIVES, configured by conf/objective/) and their losses (LOSSES).

base.py holds the protocol the trainer calls; losses.py the per-position losses; ttt.py the Eagle3 TTT unroll.
"""

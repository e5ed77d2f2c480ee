"""How channels leave: one shot (:mod:`.oneshot`), progressive (:mod:`.progressive`),
stage-wise DCP/LCP (:mod:`.stagewise`), GCP (:mod:`.gcp`) and the from-scratch control
(:mod:`.scratch`); the options each accepts are declared, without torch, in
:mod:`.options`."""

"""Engine integrations: where SP-NGD meets the training frameworks that drive it (:mod:`.deepspeed`)."""

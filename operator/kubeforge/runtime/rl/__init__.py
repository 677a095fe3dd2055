"""RLJob runtime: rewards, advantages and losses, rollouts, weight sync and the learner loop."""

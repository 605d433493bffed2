"""The same run on other machines: a SkyPilot task for rented GPUs, an sbatch script for Slurm."""

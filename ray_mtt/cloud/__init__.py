"""Launching the cluster on AWS: the config `ray up` starts (render), the account resources it
names (provision, boto3), the checks that would otherwise fail at launch (preflight), and the
head's MLflow server. Imports neither ray nor torch; boto3 only where AWS is called."""

set -e
echo "alpha: stage 1" > motd.txt
echo "stage 1" >> history.txt
echo "configured alpha for stage 1 in $PWD"

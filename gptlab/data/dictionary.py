"""Hand-made word lists for the generated task mixture (gptlab.data.mixture).

* ``EN_ZH``: ~400 common English words with one Simplified Chinese translation each. Both sides are
  unique, so "苹果 => apple" and "apple => 苹果" each have exactly one right answer.
* ``WORDS``: common English words (the dictionary's plus more) for the unscrambling tasks.
* ``CAPITALS`` and ``OPPOSITES``: small fact tables for question/answer lines with checkable answers.

Written by hand for this project; kept as plain "english 中文" lines so they are easy to review.
"""
from __future__ import annotations

_EN_ZH = """
apple 苹果
banana 香蕉
orange 橙子
grape 葡萄
pear 梨
peach 桃子
lemon 柠檬
watermelon 西瓜
strawberry 草莓
cherry 樱桃
rice 米饭
bread 面包
noodle 面条
egg 鸡蛋
milk 牛奶
tea 茶
coffee 咖啡
water 水
juice 果汁
beer 啤酒
wine 葡萄酒
sugar 糖
salt 盐
meat 肉
beef 牛肉
pork 猪肉
chicken 鸡肉
fish 鱼
vegetable 蔬菜
potato 土豆
tomato 西红柿
carrot 胡萝卜
cake 蛋糕
cheese 奶酪
soup 汤
dog 狗
cat 猫
horse 马
cow 奶牛
pig 猪
sheep 羊
bird 鸟
duck 鸭子
tiger 老虎
lion 狮子
elephant 大象
monkey 猴子
rabbit 兔子
mouse 老鼠
snake 蛇
bear 熊
wolf 狼
fox 狐狸
panda 熊猫
dragon 龙
butterfly 蝴蝶
bee 蜜蜂
ant 蚂蚁
frog 青蛙
turtle 乌龟
whale 鲸鱼
sun 太阳
moon 月亮
star 星星
sky 天空
cloud 云
rain 雨
snow 雪
wind 风
river 河
mountain 山
sea 海
lake 湖
forest 森林
tree 树
flower 花
grass 草
leaf 叶子
stone 石头
sand 沙子
fire 火
earth 地球
island 岛
desert 沙漠
spring 春天
summer 夏天
autumn 秋天
winter 冬天
morning 早上
evening 晚上
night 夜
day 天
week 星期
month 月份
year 年
today 今天
tomorrow 明天
yesterday 昨天
time 时间
hour 小时
minute 分钟
head 头
face 脸
eye 眼睛
ear 耳朵
nose 鼻子
mouth 嘴
tooth 牙齿
hair 头发
hand 手
foot 脚
arm 胳膊
leg 腿
heart 心
blood 血
body 身体
father 父亲
mother 母亲
brother 兄弟
sister 姐妹
son 儿子
daughter 女儿
husband 丈夫
wife 妻子
child 孩子
baby 婴儿
friend 朋友
teacher 老师
student 学生
doctor 医生
nurse 护士
farmer 农民
cook 厨师
driver 司机
king 国王
queen 王后
prince 王子
princess 公主
soldier 士兵
police 警察
man 男人
woman 女人
boy 男孩
girl 女孩
people 人们
family 家庭
house 房子
home 家
room 房间
door 门
window 窗户
table 桌子
chair 椅子
bed 床
wall 墙
floor 地板
kitchen 厨房
garden 花园
school 学校
hospital 医院
library 图书馆
bank 银行
shop 商店
market 市场
restaurant 餐馆
hotel 酒店
park 公园
city 城市
village 村庄
country 国家
road 路
street 街道
bridge 桥
station 车站
airport 机场
church 教堂
castle 城堡
car 汽车
bus 公共汽车
train 火车
plane 飞机
ship 船
bicycle 自行车
book 书
pen 钢笔
pencil 铅笔
paper 纸
letter 信
newspaper 报纸
computer 电脑
phone 电话
television 电视
camera 相机
clock 钟
watch 手表
key 钥匙
box 盒子
bag 包
cup 杯子
bowl 碗
plate 盘子
knife 刀
spoon 勺子
chopsticks 筷子
bottle 瓶子
umbrella 雨伞
hat 帽子
shirt 衬衫
shoe 鞋
dress 连衣裙
coat 外套
glasses 眼镜
money 钱
gold 金子
silver 银
iron 铁
music 音乐
song 歌
picture 图画
game 游戏
ball 球
toy 玩具
gift 礼物
story 故事
word 单词
language 语言
name 名字
question 问题
answer 答案
problem 难题
idea 主意
dream 梦
love 爱
life 生活
death 死亡
world 世界
war 战争
peace 和平
light 光
color 颜色
red 红色
blue 蓝色
green 绿色
yellow 黄色
black 黑色
white 白色
purple 紫色
brown 棕色
pink 粉色
gray 灰色
one 一
two 二
three 三
four 四
five 五
six 六
seven 七
eight 八
nine 九
ten 十
hundred 百
thousand 千
big 大
small 小
long 长
short 短
tall 高
low 低
hot 热
cold 冷
warm 温暖
cool 凉快
new 新
old 旧
young 年轻
good 好
bad 坏
beautiful 美丽
happy 快乐
sad 难过
angry 生气
tired 累
hungry 饿
thirsty 渴
rich 富有
poor 贫穷
fast 快
slow 慢
easy 容易
difficult 困难
early 早
late 晚
clean 干净
dirty 脏
full 满
empty 空
heavy 重
light-weight 轻
strong 强壮
weak 虚弱
busy 忙
free 免费
quiet 安静
loud 大声
bright 明亮
dark 黑暗
sweet 甜
bitter 苦
sour 酸
spicy 辣
true 真
false 假
right 右
left 左
up 上
down 下
inside 里面
outside 外面
near 近
far 远
here 这里
there 那里
eat 吃
drink 喝
sleep 睡觉
walk 走
run 跑
jump 跳
swim 游泳
fly 飞
sit 坐
stand 站
read 读
write 写
speak 说
listen 听
see 看见
look 看
sing 唱
dance 跳舞
play 玩
work 工作
study 学习
learn 学
teach 教
buy 买
sell 卖
give 给
take 拿
open 打开
close 关闭
come 来
go 去
live 住
die 死
laugh 笑
cry 哭
think 想
know 知道
understand 理解
remember 记得
forget 忘记
help 帮助
wait 等
find 找到
lose 丢失
begin 开始
finish 完成
cook-food 做饭
wash 洗
want 想要
like 喜欢
hate 恨
hope 希望
ask 问
answer-back 回答
call 打电话
travel 旅行
drive 开车
climb 爬
build 建造
break 打破
win 赢
fight 打架
kill 杀
carry 搬
throw 扔
catch 抓住
push 推
pull 拉
draw 画
send 发送
receive 收到
pay 付钱
borrow 借
rain-fall 下雨
always 总是
never 从不
often 经常
sometimes 有时
now 现在
again 再
very 非常
together 一起
only 只
also 也
yes 是
no 不
please 请
thanks 谢谢
sorry 对不起
hello 你好
goodbye 再见
China 中国
England 英国
France 法国
Japan 日本
Germany 德国
America 美国
Russia 俄罗斯
Italy 意大利
Spain 西班牙
India 印度
Beijing 北京
London 伦敦
Paris 巴黎
Tokyo 东京
east 东
west 西
south 南
north 北
left-hand 左手
right-hand 右手
hundred-years 百年
north-wind 北风
health 健康
medicine 药
disease 疾病
weather 天气
holiday 假期
birthday 生日
party 聚会
wedding 婚礼
job 职业
office 办公室
company 公司
factory 工厂
machine 机器
sport 运动
football 足球
basketball 篮球
team 队
horse-riding 骑马
history 历史
science 科学
art 艺术
mathematics 数学
poem 诗
play-script 剧本
theatre 剧院
actor 演员
heaven 天堂
ghost 鬼
god 神
sword 剑
crown 王冠
ring 戒指
""".strip()


def _pairs(block: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in block.splitlines():
        en, zh = line.split()
        # Entries like "light-weight" disambiguate English homographs; drop them to keep plain words.
        if "-" in en:
            continue
        out[en] = zh
    return out


EN_ZH: dict[str, str] = _pairs(_EN_ZH)
ZH_EN: dict[str, str] = {zh: en for en, zh in EN_ZH.items()}

_MORE_WORDS = """
about above across action active actually afraid after afternoon against agree ahead alive allow
almost alone along already although amount ancient animal another anyone anything appear area army
around arrive attack attention aunt avoid awake away back bake balance band basket battle beach
beard beast beauty became because become before behind believe belong below beside better between
beyond blanket blind board boat bone border bottom brain branch brave breakfast breath brick bring
broad brush bucket bundle burn butter button cabin candle captain card care careful carpet case
center certain chain chalk chance change chapter chase cheap chest chief choice choose circle class
clever cliff cloth coast coin collect common corner cotton cottage count courage course cousin cover
crack crowd cruel curtain custom damage danger daring dead deal dear decide deep deliver depth
desire detail dinner direction discover distance divide double doubt dozen drawer dress drop dry
during duty eager early edge effort either elbow else enemy enough enter equal escape even event
every exact example except expect explain fable fact fail faint fair faith fall famous fancy farm
fear feast feather feel fellow fence fever field figure final finger flame flat flight float flock
follow fool force foreign forget form fortune forward frame fresh front fruit funny future gather
general gentle giant glad glass glove grace grain grand grave great ground group grow guard guess
guest guide habit half hall hammer handle hang harbor hard harvest haste heat height hidden hill
hire hold hole hollow honest honor horn human humble hunt hurry idle ill important inch indeed
iron jewel join journey judge kind kingdom kitchen knee knock labor ladder lady lamp land large
laugh lead learn least leave lesson level liberty lift limit line lip little lock lonely lord loud
lovely lucky lunch maiden manner march mark master match matter meadow measure meet memory mercy
merry message metal middle might mind minute mirror mistake modern moment motion mountain narrow
nation nature neither nephew nest noble noise notice number object ocean offer order other ought
owner paint palace pale parent part pass patient pattern pause pearl penny perhaps person piece
pillow pilot place plain planet plant pleasant plenty pocket point pond pool power praise prayer
present pretty price pride print prison prize promise proper proud public pupil purse quarter
quick quite rabbit race rather reach ready reason record remain reply report rest return reward
ribbon riddle river roar rock roll roof root rope rough round royal rule sail sailor scale secret
seed seem servant settle shade shadow shake shape share sharp shelf shell shield shine shore
shoulder shout sight sign silence silent silk simple since single skill skin slave sleeve smile
smoke smooth soft soldier solid sorrow sort sound space spare speech spend spirit splendid spoil
square stage stair stamp steady steam steel step stick still stock storm straight strange stream
strength string stripe struggle subject sudden suffer supper supply suppose sure surface surprise
sweep swift system tail tale taste tax tear temple tender thick thin thread throat thunder ticket
tiny title tongue tonight tool total touch tower town trade travel treasure tremble trick trouble
trust truth turn twice uncle under unless until upon useful valley value verse vessel view virtue
visit voice wander warn waste wealth weapon weary wedding welcome wheel whisper whole wicked wide
widow wild willing window wisdom wise wish within without witness wonder wooden worth wrong yard
youth zero
"""

WORDS: list[str] = sorted({w for w in EN_ZH if w.isalpha() and w.islower()}
                          | set(_MORE_WORDS.split()))

CAPITALS: dict[str, str] = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "England": "London", "Ireland": "Dublin", "Scotland": "Edinburgh", "Wales": "Cardiff",
    "Belgium": "Brussels", "Netherlands": "Amsterdam", "Austria": "Vienna", "Switzerland": "Bern",
    "Denmark": "Copenhagen", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Iceland": "Reykjavik", "Poland": "Warsaw", "Hungary": "Budapest", "Greece": "Athens",
    "Russia": "Moscow", "Ukraine": "Kyiv", "Turkey": "Ankara", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Ethiopia": "Addis Ababa", "Nigeria": "Abuja", "Ghana": "Accra", "Morocco": "Rabat",
    "China": "Beijing", "Japan": "Tokyo", "South Korea": "Seoul", "India": "New Delhi",
    "Pakistan": "Islamabad", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Indonesia": "Jakarta",
    "Philippines": "Manila", "Malaysia": "Kuala Lumpur", "Iran": "Tehran", "Iraq": "Baghdad",
    "Jordan": "Amman", "Saudi Arabia": "Riyadh", "Afghanistan": "Kabul", "Nepal": "Kathmandu",
    "Mongolia": "Ulaanbaatar", "Australia": "Canberra", "New Zealand": "Wellington",
    "Canada": "Ottawa", "the United States": "Washington", "Mexico": "Mexico City", "Cuba": "Havana",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Chile": "Santiago", "Peru": "Lima",
    "Colombia": "Bogota", "Venezuela": "Caracas", "Czechia": "Prague", "Romania": "Bucharest",
    "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb", "Estonia": "Tallinn",
    "Latvia": "Riga", "Lithuania": "Vilnius", "Cyprus": "Nicosia", "Malta": "Valletta",
}

# Pairs of opposites; questions go both ways ("opposite of hot" -> cold, "opposite of cold" -> hot).
OPPOSITES: list[tuple[str, str]] = [
    ("hot", "cold"), ("big", "small"), ("long", "short"), ("fast", "slow"), ("up", "down"),
    ("left", "right"), ("old", "new"), ("good", "bad"), ("happy", "sad"), ("rich", "poor"),
    ("early", "late"), ("clean", "dirty"), ("full", "empty"), ("heavy", "light"), ("strong", "weak"),
    ("loud", "quiet"), ("dark", "bright"), ("true", "false"), ("inside", "outside"), ("near", "far"),
    ("open", "shut"), ("day", "night"), ("black", "white"), ("high", "low"), ("easy", "difficult"),
    ("wet", "dry"), ("hard", "soft"), ("thick", "thin"), ("wide", "narrow"), ("deep", "shallow"),
    ("alive", "dead"), ("love", "hate"), ("win", "lose"), ("buy", "sell"), ("give", "take"),
    ("begin", "end"), ("come", "go"), ("push", "pull"), ("laugh", "cry"), ("remember", "forget"),
    ("question", "answer"), ("friend", "enemy"), ("war", "peace"), ("north", "south"),
    ("east", "west"), ("king", "queen"), ("man", "woman"), ("boy", "girl"), ("father", "mother"),
    ("brother", "sister"), ("son", "daughter"), ("husband", "wife"), ("sweet", "sour"),
    ("first", "last"), ("before", "after"), ("above", "below"), ("always", "never"),
    ("noisy", "silent"), ("cheap", "costly"),
    ("arrive", "depart"), ("accept", "refuse"), ("sunrise", "sunset"), ("summer", "winter"),
    ("heaven", "hell"), ("entrance", "exit"), ("inhale", "exhale"), ("wise", "foolish"),
    ("brave", "cowardly"), ("kind", "cruel"), ("honest", "dishonest"), ("polite", "rude"),
    ("possible", "impossible"), ("visible", "invisible"), ("maximum", "minimum"),
]
